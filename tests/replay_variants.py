"""Changes to IncidentWorkflow for tests/test_replay.py to replay recorded histories against.
Not sandboxed: the sandbox cannot re-import a subclass of a workflow it passes through."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain.incident import ActionRequest, IncidentInput, IncidentResult, IncidentState
    from workflows.incident import IncidentWorkflow


@workflow.defn(name="IncidentWorkflow", sandboxed=False)
class ThanksUnpatched(IncidentWorkflow):
    """A plausible change: thank whoever acknowledged, in the thread (one more Slack call)."""

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentResult:
        return await super().run(input)

    @workflow.update
    def acknowledge(self, request: ActionRequest) -> IncidentState:
        self._view.lane("slack").push("reply", text=f"thanks <@{request.user}>")
        return super().acknowledge(request)


@workflow.defn(name="IncidentWorkflow", sandboxed=False)
class ThanksPatched(IncidentWorkflow):
    """The same change, the way README "Changing workflow code" says to make it."""

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentResult:
        return await super().run(input)

    @workflow.update
    def acknowledge(self, request: ActionRequest) -> IncidentState:
        if workflow.patched("thank-whoever-acknowledged"):
            self._view.lane("slack").push("reply", text=f"thanks <@{request.user}>")
        return super().acknowledge(request)


@workflow.defn(name="IncidentWorkflow", sandboxed=False)
class KeepaliveBehindAPatch(IncidentWorkflow):
    """The keep-alive put behind `workflow.patched` after the fact. It landed together with the
    runbooks (one release), so every run that has controls also has its timer, and no marker."""

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentResult:
        return await super().run(input)

    async def _keep_controls_alive(self) -> None:
        if workflow.patched("controls-keepalive"):
            await super()._keep_controls_alive()
