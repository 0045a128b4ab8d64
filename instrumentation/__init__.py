"""Instrumentation for applications that call the OpenAI API.

from openai import OpenAI
from instrumentation import instrument, llm_context

client = instrument(OpenAI())
with llm_context(feature="chat", team="platform", user_id="u42", session_id="s1"):
    client.chat.completions.create(model="gpt-4.1", messages=[...])
"""

from instrumentation.context import llm_context
from instrumentation.openai_client import instrument
from instrumentation.recorder import Recorder, StoreSink

__all__ = ["Recorder", "StoreSink", "instrument", "llm_context"]
