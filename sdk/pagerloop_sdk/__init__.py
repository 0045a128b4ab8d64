"""pagerloop's app side: records every OpenAI call and enforces the runbook controls in force.

from openai import OpenAI
from pagerloop_sdk import instrument, llm_context

client = instrument(OpenAI())  # PAGERLOOP_URL and PAGERLOOP_API_KEY, or url= / api_key=
with llm_context(feature="chat", team="platform", user_id="u42", session_id="s1"):
    client.chat.completions.create(model="gpt-4.1", messages=[...])

Records go to the pagerloop API in gzipped batches from a background thread; the controls come
from it every 2 s. A disabled feature raises `FeatureDisabled` (an `openai.OpenAIError`)
without sending anything.
"""

from pagerloop_sdk.context import llm_context
from pagerloop_sdk.controls import ControlSource, FeatureDisabled
from pagerloop_sdk.openai_client import instrument
from pagerloop_sdk.recorder import Recorder

__all__ = [
    "ControlSource",
    "FeatureDisabled",
    "Recorder",
    "instrument",
    "llm_context",
]
