"""Instrumentation for applications that call the OpenAI API.

from openai import OpenAI
from instrumentation import instrument, llm_context

client = instrument(OpenAI())
with llm_context(feature="chat", team="platform", user_id="u42", session_id="s1"):
    client.chat.completions.create(model="gpt-4.1", messages=[...])

Runbook controls in force are enforced on every call; a disabled feature raises
`FeatureDisabled` (an `openai.OpenAIError`) without sending anything.
"""

from instrumentation.context import llm_context
from instrumentation.controls import ControlSource, FeatureDisabled
from instrumentation.openai_client import instrument
from instrumentation.recorder import Recorder, StoreSink

__all__ = [
    "ControlSource",
    "FeatureDisabled",
    "Recorder",
    "StoreSink",
    "instrument",
    "llm_context",
]
