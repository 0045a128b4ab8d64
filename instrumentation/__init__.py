"""Instrumentation: pricing, user-id hashing and (later) the OpenAI SDK wrapper."""
