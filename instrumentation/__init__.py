"""The server's side of the SDK (`pagerloop_sdk`): its recorder writing straight into the
stores and its controls read from them, for the clients the server runs in-process (embedded
mode, `pagerloop simulate`, tests); and the GenAI span reading behind OTLP ingest."""
