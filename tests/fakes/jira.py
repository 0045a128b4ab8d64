"""A local Jira Server REST API v2: issue create / get / search, comments and transitions.

Answers in Jira's shapes: 201 `{"id", "key", "self"}` on create, 400
`{"errorMessages": [], "errors": {field: message}}` for a bad issue, 404
`{"errorMessages": ["Issue Does Not Exist"], "errors": {}}`, 401 without credentials.
The JQL it understands is what pagerloop sends: `project = X AND labels = "y"` clauses.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import FakeServer, read_body

TRANSITIONS = [
    {"id": "11", "name": "To Do", "to": {"name": "To Do", "id": "10000"}},
    {"id": "21", "name": "In Progress", "to": {"name": "In Progress", "id": "3"}},
    {"id": "31", "name": "Done", "to": {"name": "Done", "id": "10001"}},
]
_CLAUSE = re.compile(r'^\s*(\w+)\s*=\s*"?([^"]+?)"?\s*$')


class FakeJira(FakeServer):
    def __init__(self, projects: tuple[str, ...] = ("OPS",)) -> None:
        super().__init__(
            [
                Route("/rest/api/2/serverInfo", self._server_info),
                Route("/rest/api/2/field", self._fields),
                Route("/rest/api/2/issue", self._create, methods=["POST"]),
                Route("/rest/api/2/search", self._search, methods=["GET", "POST"]),
                Route("/rest/api/2/issue/{key}", self._get),
                Route("/rest/api/2/issue/{key}/comment", self._comment, methods=["GET", "POST"]),
                Route(
                    "/rest/api/2/issue/{key}/transitions",
                    self._transitions,
                    methods=["GET", "POST"],
                ),
            ]
        )
        self.projects = set(projects)
        self.issues: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(10001)
        self._comment_ids = itertools.count(20001)
        self.delays: dict[str, float] = {}  # "create" -> seconds to wait after creating
        self.unavailable = False  # an outage: every request answered 503 until set back
        self.app.add_exception_handler(_UnavailableError, self._answer_unavailable)

    def invalid_json(self, reason: str) -> Response:
        return JSONResponse(
            {"errorMessages": [f"Unexpected character: {reason}"], "errors": {}}, 400
        )

    async def _answer_unavailable(self, request: Request, exc: Exception) -> Response:
        return JSONResponse(
            {"errorMessages": ["Service Unavailable"], "errors": {}},
            503,
            {"Retry-After": "60"},
        )

    def delay_next(self, operation: str, seconds: float) -> None:
        """Do the work, then keep the caller waiting (a worker may die meanwhile)."""
        self.delays[operation] = seconds

    async def _recorded(self, request: Request) -> dict[str, Any] | None:
        body, data = await read_body(request)
        self.record(request, body, data)
        if self.unavailable:
            raise _UnavailableError
        if "authorization" not in request.headers:
            return None
        return data

    def _self(self, path: str) -> str:
        return f"{self.url}/rest/api/2/{path}"

    async def _server_info(self, request: Request) -> Response:
        await self._recorded(request)
        return JSONResponse(
            {
                "baseUrl": self.url,
                "version": "9.12.0",
                "versionNumbers": [9, 12, 0],
                "deploymentType": "Server",
                "serverTitle": "fake jira",
            }
        )

    async def _fields(self, request: Request) -> Response:
        await self._recorded(request)
        return JSONResponse(
            [{"id": "summary", "name": "Summary"}, {"id": "labels", "name": "Labels"}]
        )

    async def _create(self, request: Request) -> Response:
        data = await self._recorded(request)
        if data is None:
            return _unauthorized()
        fields = data.get("fields", {})
        errors = {}
        project = (fields.get("project") or {}).get("key")
        if project not in self.projects:
            errors["project"] = "valid project is required"
        if not fields.get("summary"):
            errors["summary"] = "You must specify a summary of the issue."
        if not (fields.get("issuetype") or {}).get("name"):
            errors["issuetype"] = "valid issue type is required"
        if errors:
            return JSONResponse({"errorMessages": [], "errors": errors}, 400)
        issue_id = str(next(self._ids))
        key = f"{project}-{sum(1 for i in self.issues.values() if i['project'] == project) + 1}"
        with self.lock:
            self.issues[key] = {
                "id": issue_id,
                "key": key,
                "project": project,
                "fields": dict(fields),
                "status": "To Do",
                "comments": [],
            }
        delay = self.delays.pop("create", 0.0)
        if delay:
            await asyncio.sleep(delay)
        return JSONResponse(
            {"id": issue_id, "key": key, "self": self._self(f"issue/{issue_id}")}, 201
        )

    def _find(self, key_or_id: str) -> dict[str, Any] | None:
        if key_or_id in self.issues:
            return self.issues[key_or_id]
        return next((i for i in self.issues.values() if i["id"] == key_or_id), None)

    def _render(self, issue: dict[str, Any]) -> dict[str, Any]:
        fields = dict(issue["fields"])
        fields["status"] = {"name": issue["status"]}
        fields["comment"] = {
            "comments": issue["comments"],
            "total": len(issue["comments"]),
            "maxResults": len(issue["comments"]),
            "startAt": 0,
        }
        fields.setdefault("labels", [])
        return {
            "id": issue["id"],
            "key": issue["key"],
            "self": self._self(f"issue/{issue['id']}"),
            "fields": fields,
        }

    async def _get(self, request: Request) -> Response:
        if await self._recorded(request) is None:
            return _unauthorized()
        issue = self._find(request.path_params["key"])
        if issue is None:
            return _not_found()
        return JSONResponse(self._render(issue))

    async def _comment(self, request: Request) -> Response:
        data = await self._recorded(request)
        if data is None:
            return _unauthorized()
        issue = self._find(request.path_params["key"])
        if issue is None:
            return _not_found()
        if request.method == "GET":
            comments = issue["comments"]
            return JSONResponse(
                {"comments": comments, "total": len(comments), "startAt": 0, "maxResults": 50}
            )
        if not data.get("body"):
            return JSONResponse(
                {"errorMessages": [], "errors": {"comment": "Comment body can not be empty!"}}, 400
            )
        comment_id = str(next(self._comment_ids))
        comment = {
            "id": comment_id,
            "self": self._self(f"issue/{issue['id']}/comment/{comment_id}"),
            "body": data["body"],
            "author": {"name": "pagerloop", "displayName": "pagerloop"},
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000"),
        }
        with self.lock:
            issue["comments"].append(comment)
        return JSONResponse(comment, 201)

    async def _transitions(self, request: Request) -> Response:
        data = await self._recorded(request)
        if data is None:
            return _unauthorized()
        issue = self._find(request.path_params["key"])
        if issue is None:
            return _not_found()
        if request.method == "GET":
            return JSONResponse({"expand": "transitions", "transitions": TRANSITIONS})
        wanted = str((data.get("transition") or {}).get("id", ""))
        transition = next((t for t in TRANSITIONS if t["id"] == wanted), None)
        if transition is None:
            return JSONResponse(
                {
                    "errorMessages": [f"Transition id '{wanted}' is not valid for this issue."],
                    "errors": {},
                },
                400,
            )
        with self.lock:
            issue["status"] = transition["to"]["name"]
        return Response(status_code=204)

    async def _search(self, request: Request) -> Response:
        data = await self._recorded(request)
        if data is None:
            return _unauthorized()
        jql = str(data.get("jql") or request.query_params.get("jql", ""))
        clauses = [c for c in re.split(r"\s+AND\s+", jql, flags=re.IGNORECASE) if c.strip()]
        wanted: list[tuple[str, str]] = []
        for clause in clauses:
            match = _CLAUSE.match(clause)
            if match is None:
                return JSONResponse(
                    {"errorMessages": [f"Error in the JQL Query: {clause!r}"], "errors": {}}, 400
                )
            wanted.append((match.group(1).lower(), match.group(2)))
        found = [i for i in self.issues.values() if all(_matches(i, f, v) for f, v in wanted)]
        return JSONResponse(
            {
                "startAt": 0,
                "maxResults": 50,
                "total": len(found),
                "issues": [self._render(i) for i in found],
            }
        )


def _matches(issue: dict[str, Any], field: str, value: str) -> bool:
    if field == "project":
        return bool(issue["project"] == value)
    if field == "labels":
        return value in issue["fields"].get("labels", [])
    if field == "key":
        return bool(issue["key"] == value)
    if field == "status":
        return bool(issue["status"] == value)
    return False


class _UnavailableError(Exception):
    """Raised by a handler while the fake is `unavailable`: answered 503."""


def _unauthorized() -> Response:
    return JSONResponse(
        {
            "errorMessages": [
                "You are not authenticated. Authentication required to perform this operation."
            ],
            "errors": {},
        },
        401,
    )


def _not_found() -> Response:
    return JSONResponse({"errorMessages": ["Issue Does Not Exist"], "errors": {}}, 404)
