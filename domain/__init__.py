"""The ground floor: the types and the maths every layer shares (severities and triggers,
scopes, incident state and events, escalation policies, signal aggregates and the usage
counters they sum, latency histograms, canary statistics, search attributes and workflow names).

It imports nothing of ours, so any layer may import it; workflow code does, inside
`workflow.unsafe.imports_passed_through()`. Pure code and plain data only: no I/O, no clients,
no settings.
"""
