"""pagerloop's app side: records every OpenAI call and enforces the runbook controls in force.

from openai import OpenAI
from pagerloop_sdk import instrument, llm_context

client = instrument(OpenAI())  # PAGERLOOP_URL and PAGERLOOP_API_KEY, or url= / api_key=
with llm_context(feature="chat", team="platform", user_id="u42", session_id="s1"):
    client.chat.completions.create(model="gpt-4.1", messages=[...])

Records go to the pagerloop API in gzipped batches from a background thread; the controls come
from it every 2 s. A disabled feature raises `FeatureDisabled` (an `openai.OpenAIError`)
without sending anything. A reroute to `model@name` goes to the endpoint the app named
`name` (`register_endpoint`, or PAGERLOOP_ENDPOINT_<NAME>_BASE_URL / _API_KEY / _API_VERSION).
A queue control that cannot release a call in time raises `QueueTimeout` (an
`openai.APITimeoutError`) without sending it. A validate control checks answers with the checks
the app registers here (`register_schema`, `register_validator`) and retries once on a failure.
"""

from pagerloop_sdk.context import llm_context
from pagerloop_sdk.controls import ControlSource, FeatureDisabled
from pagerloop_sdk.endpoints import register_endpoint
from pagerloop_sdk.openai_client import instrument
from pagerloop_sdk.queueing import QueueTimeout
from pagerloop_sdk.recorder import Recorder
from pagerloop_sdk.validation import register_schema, register_validator

__all__ = [
    "ControlSource",
    "FeatureDisabled",
    "QueueTimeout",
    "Recorder",
    "instrument",
    "llm_context",
    "register_endpoint",
    "register_schema",
    "register_validator",
]
