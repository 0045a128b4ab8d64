"""A small chat app instrumented with pagerloop: N chat completions, each printed briefly.

    python chat_app.py [N]      (N, else CHAT_APP_CALLS, else 10)

The SDK sends each call's record to PAGERLOOP_URL with PAGERLOOP_API_KEY (an ingest key) and
applies the runbook controls in force; the OpenAI client reads OPENAI_BASE_URL and
OPENAI_API_KEY. `docker compose --profile example up` runs it against llmock (a fake OpenAI).
"""

from __future__ import annotations

import os
import sys
import time

from openai import OpenAI, OpenAIError
from pagerloop_sdk import instrument, llm_context

QUESTIONS = ["What is an SLO?", "Why page on symptoms?", "What is a runbook?"]


def main() -> None:
    calls = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CHAT_APP_CALLS", "10"))
    client = instrument(OpenAI())
    for i in range(calls):
        question = QUESTIONS[i % len(QUESTIONS)]
        try:
            with llm_context(feature="chat", team="platform", user_id="u42"):
                response = client.chat.completions.create(
                    model="gpt-4.1-mini", messages=[{"role": "user", "content": question}]
                )
            answer = (response.choices[0].message.content or "").replace("\n", " ")
            print(f"{i + 1}/{calls} {response.model}: {answer[:70]}")
        except OpenAIError as exc:  # also a feature a runbook disabled (FeatureDisabled)
            print(f"{i + 1}/{calls} failed: {type(exc).__name__}: {exc}")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
