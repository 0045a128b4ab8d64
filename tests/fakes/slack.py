"""A local Slack Web API: chat.postMessage, chat.update, chat.postEphemeral, auth.test,
conversations.list, conversations.history and conversations.replies, and file uploads as
slack-sdk's `files_upload_v2` makes them: files.getUploadURLExternal (an upload URL on this
server), the raw POST of the bytes to that URL, files.completeUploadExternal (shares the file in a
channel, or in a thread with `thread_ts`, as a message carrying `files`).

Speaks Slack's wire format: form or JSON bodies, `Authorization: Bearer xoxb-…`, HTTP 200 with
`{"ok": false, "error": …}` for API errors, HTTP 429 with `Retry-After` when rate limited, and
the Block Kit limits Slack enforces (`invalid_blocks`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import FakeServer, read_body, strict_loads


@dataclass
class Fault:
    method: str
    error: str
    status: int = 200
    retry_after: int | None = None


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    edits: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    replies: list[str] = field(default_factory=list)  # the thread's texts, in order
    thread: list[Message] = field(default_factory=list)  # the thread's replies themselves
    thread_ts: str | None = None  # a reply's parent
    files: list[dict[str, Any]] = field(default_factory=list)  # a file share's files


@dataclass
class UploadedFile:
    """A file from files.getUploadURLExternal on: its bytes once posted to its upload URL, and
    where files.completeUploadExternal shared it."""

    id: str
    filename: str
    length: int  # as announced
    alt_txt: str | None = None
    data: bytes | None = None
    title: str | None = None
    completed: bool = False
    channel: str | None = None
    thread_ts: str | None = None
    initial_comment: str | None = None

    def info(self) -> dict[str, Any]:
        """The file object Slack answers with (a few of its fields)."""
        return {
            "id": self.id,
            "name": self.filename,
            "title": self.title or self.filename,
            "mimetype": "image/png"
            if self.filename.endswith(".png")
            else "application/octet-stream",
            "filetype": self.filename.rpartition(".")[2] if "." in self.filename else "binary",
            "size": len(self.data or b""),
            "alt_txt": self.alt_txt,
            "channels": [self.channel] if self.channel else [],
        }


# files.getUploadURLExternal's limit on `length` (Slack's: 1 GB).
MAX_UPLOAD_BYTES = 1_000_000_000


def block_errors(blocks: list[dict[str, Any]]) -> list[str]:
    """Violations of Slack's published Block Kit limits."""
    errors = []
    if len(blocks) > 50:
        errors.append(f"too many blocks: {len(blocks)} > 50")
    for i, block in enumerate(blocks):
        kind = block.get("type")
        text = (block.get("text") or {}).get("text", "")
        if kind == "header" and len(text) > 150:
            errors.append(f"blocks[{i}].text: header longer than 150")
        if kind == "section":
            if len(text) > 3000:
                errors.append(f"blocks[{i}].text: section text longer than 3000")
            fields = block.get("fields", [])
            if len(fields) > 10:
                errors.append(f"blocks[{i}].fields: more than 10")
            errors += [
                f"blocks[{i}].fields[{j}]: longer than 2000"
                for j, f in enumerate(fields)
                if len(f.get("text", "")) > 2000
            ]
        if kind == "actions":
            elements = block.get("elements", [])
            if len(elements) > 25:
                errors.append(f"blocks[{i}].elements: more than 25")
            for j, element in enumerate(elements):
                if len(element.get("text", {}).get("text", "")) > 75:
                    errors.append(f"blocks[{i}].elements[{j}].text: longer than 75")
                if len(element.get("action_id", "")) > 255:
                    errors.append(f"blocks[{i}].elements[{j}].action_id: longer than 255")
                if len(element.get("value", "")) > 2000:
                    errors.append(f"blocks[{i}].elements[{j}].value: longer than 2000")
    return errors


class FakeSlack(FakeServer):
    def __init__(self, missing_channels: tuple[str, ...] = ()) -> None:
        super().__init__(
            [
                Route("/api/{method}", self._handle, methods=["POST", "GET"]),
                Route("/upload/v1/{file_id}", self._upload, methods=["POST"]),
            ]
        )
        self.revoked_tokens: set[str] = set()
        self.missing_channels = set(missing_channels)
        self.faults: deque[Fault] = deque()
        self.messages: dict[tuple[str, str], Message] = {}
        self.ephemeral: list[dict[str, Any]] = []
        self.delays: dict[str, float] = {}  # method -> seconds to wait after answering
        self.unavailable = False  # an outage: every call answered 503 until set back
        # A rate-limit storm: every call answered HTTP 429 `ratelimited` with this Retry-After
        # (seconds) until set back to None.
        self.rate_limited: int | None = None
        self._channel_ids: dict[str, str] = {}
        self._ts = itertools.count(1)
        self.files: dict[str, UploadedFile] = {}  # by file id, from files.getUploadURLExternal on
        self._file_ids = itertools.count(1)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def invalid_json(self, reason: str) -> Response:
        # Slack answers a body it cannot parse like any API error: HTTP 200, `ok: false`.
        return _error("invalid_json", detail=reason)

    def fail_next(
        self, method: str, error: str, status: int = 200, retry_after: int | None = None
    ) -> None:
        self.faults.append(Fault(method, error, status, retry_after))

    def delay_next(self, method: str, seconds: float) -> None:
        """Do the work, then keep the caller waiting (a worker may die meanwhile)."""
        self.delays[method] = seconds

    def top_level(self) -> list[Message]:
        return list(self.messages.values())

    def posts(self) -> list[dict[str, Any]]:
        """chat.postMessage calls that were not thread replies."""
        return [c for c in self.calls("chat.postMessage") if not c.get("thread_ts")]

    def calls(self, method: str) -> list[dict[str, Any]]:
        return [r.data for r in self.received(f"/api/{method}")]

    def uploaded(
        self, channel: str | None = None, thread_ts: str | None = None
    ) -> list[UploadedFile]:
        """The files shared by files.completeUploadExternal (in that channel / thread)."""
        with self.lock:
            return [
                f
                for f in self.files.values()
                if f.completed
                and (channel is None or f.channel == channel)
                and (thread_ts is None or f.thread_ts == thread_ts)
            ]

    def channel_id(self, name: str) -> str:
        name = name.lstrip("#")
        if name not in self._channel_ids:
            self._channel_ids[name] = f"C{len(self._channel_ids) + 1:08d}"
        return self._channel_ids[name]

    async def _handle(self, request: Request) -> JSONResponse:
        method = request.path_params["method"]
        body, data = await read_body(request)
        self.record(request, body, data)
        token = request.headers.get("authorization", "").removeprefix("Bearer ") or data.get(
            "token", ""
        )
        if self.unavailable:
            return JSONResponse({"ok": False, "error": "service_unavailable"}, 503)
        if self.rate_limited is not None:
            headers = {"Retry-After": str(self.rate_limited)}
            return JSONResponse({"ok": False, "error": "ratelimited"}, 429, headers)
        with self.lock:
            fault = next((f for f in self.faults if f.method == method), None)
            if fault is not None:
                self.faults.remove(fault)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            return JSONResponse({"ok": False, "error": fault.error}, fault.status, headers)
        if not token:
            return _error("not_authed")
        if not token.startswith("xox") or token in self.revoked_tokens:
            return _error("invalid_auth")
        handler = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.postEphemeral": self._post_ephemeral,
            "conversations.list": self._list,
            "conversations.history": self._history,
            "conversations.replies": self._replies,
            "files.getUploadURLExternal": self._get_upload_url,
            "files.completeUploadExternal": self._complete_upload,
        }.get(method)
        if handler is None:
            return _error("unknown_method")
        answer = handler(data)
        delay = self.delays.pop(method, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return answer

    def _resolve_channel(self, channel: str) -> str | None:
        if not channel or channel.lstrip("#") in self.missing_channels:
            return None
        if channel.startswith("C") and channel in self._channel_ids.values():
            return channel
        return self.channel_id(channel)

    @staticmethod
    def _blocks(data: dict[str, Any]) -> list[dict[str, Any]]:
        blocks = data.get("blocks") or []
        return strict_loads(blocks) if isinstance(blocks, str) else list(blocks)

    def _auth_test(self, data: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"ok": True, "team": "pagerloop", "user": "pagerloop", "bot_id": "B1"})

    def _post_message(self, data: dict[str, Any]) -> JSONResponse:
        channel = self._resolve_channel(str(data.get("channel", "")))
        if channel is None:
            return _error("channel_not_found")
        blocks = self._blocks(data)
        if not data.get("text") and not blocks:
            return _error("no_text")
        if problems := block_errors(blocks):
            return _error("invalid_blocks", errors=problems)
        if len(str(data.get("text", ""))) > 40_000:
            return _error("msg_too_long")
        ts = f"{int(time.time())}.{next(self._ts):06d}"
        metadata = data.get("metadata")
        if isinstance(metadata, str):
            metadata = strict_loads(metadata)
        thread_ts = data.get("thread_ts")
        if thread_ts:
            parent = self.messages.get((channel, str(thread_ts)))
            if parent is None:
                return _error("thread_not_found")
            text = str(data.get("text", ""))
            reply = Message(channel, ts, text, blocks, metadata=metadata, thread_ts=parent.ts)
            with self.lock:
                parent.replies.append(text)
                parent.thread.append(reply)
            return JSONResponse({"ok": True, "channel": channel, "ts": ts})
        message = Message(channel, ts, str(data.get("text", "")), blocks, metadata=metadata)
        with self.lock:
            self.messages[(channel, ts)] = message
        return JSONResponse(
            {
                "ok": True,
                "channel": channel,
                "ts": ts,
                "message": {"type": "message", "text": message.text, "blocks": blocks, "ts": ts},
            }
        )

    def _update(self, data: dict[str, Any]) -> JSONResponse:
        channel, ts = str(data.get("channel", "")), str(data.get("ts", ""))
        if channel not in self._channel_ids.values():
            return _error("channel_not_found")
        # A thread reply is edited like any message (an ask's buttons once answered).
        message = self.messages.get((channel, ts)) or self._reply(channel, ts)
        if message is None:
            return _error("message_not_found")
        blocks = self._blocks(data)
        if problems := block_errors(blocks):
            return _error("invalid_blocks", errors=problems)
        with self.lock:
            message.edits.append({"text": message.text, "blocks": message.blocks})
            message.text, message.blocks = str(data.get("text", message.text)), blocks
        return JSONResponse({"ok": True, "channel": channel, "ts": ts, "text": message.text})

    def _reply(self, channel: str, ts: str) -> Message | None:
        with self.lock:
            return next(
                (
                    reply
                    for (c, _), parent in self.messages.items()
                    if c == channel
                    for reply in parent.thread
                    if reply.ts == ts
                ),
                None,
            )

    def _list(self, data: dict[str, Any]) -> JSONResponse:
        channels = [{"id": cid, "name": name} for name, cid in self._channel_ids.items()]
        return JSONResponse(
            {"ok": True, "channels": channels, "response_metadata": {"next_cursor": ""}}
        )

    def _history(self, data: dict[str, Any]) -> JSONResponse:
        channel = str(data.get("channel", ""))
        if channel not in self._channel_ids.values():
            return _error("channel_not_found")
        found = sorted(
            (m for (c, _), m in self.messages.items() if c == channel and _in_window(m, data)),
            key=lambda m: m.ts,
            reverse=True,
        )
        with_metadata = str(data.get("include_all_metadata", "")).lower() in ("true", "1")
        messages = [
            {"type": "message", "ts": m.ts, "text": m.text}
            | ({"metadata": m.metadata} if with_metadata and m.metadata else {})
            for m in found
        ]
        return JSONResponse({"ok": True, "messages": messages, "has_more": False})

    def _replies(self, data: dict[str, Any]) -> JSONResponse:
        """As Slack: the parent first, then its replies oldest first (those in the `oldest` /
        `latest` window), `limit` (default 1000) a page, the next page's `cursor` in
        `response_metadata.next_cursor`; `metadata` only with `include_all_metadata`."""
        channel = str(data.get("channel", ""))
        if channel not in self._channel_ids.values():
            return _error("channel_not_found")
        parent = self.messages.get((channel, str(data.get("ts", ""))))
        if parent is None:
            return _error("thread_not_found")
        with self.lock:
            thread = [parent] + [m for m in parent.thread if _in_window(m, data)]
        try:
            start = int(data.get("cursor") or 0)
            limit = int(data.get("limit") or 1000)
        except ValueError:
            return _error("invalid_cursor")
        page = thread[start : start + max(limit, 1)]
        more = start + len(page) < len(thread)
        with_metadata = str(data.get("include_all_metadata", "")).lower() in ("true", "1")
        messages = [
            {"type": "message", "ts": m.ts, "thread_ts": parent.ts, "text": m.text}
            | ({"reply_count": len(parent.thread)} if m is parent else {})
            | ({"metadata": m.metadata} if with_metadata and m.metadata else {})
            | ({"subtype": "file_share", "files": m.files} if m.files else {})
            for m in page
        ]
        return JSONResponse(
            {
                "ok": True,
                "messages": messages,
                "has_more": more,
                "response_metadata": {"next_cursor": str(start + len(page)) if more else ""},
            }
        )

    def _get_upload_url(self, data: dict[str, Any]) -> JSONResponse:
        filename = str(data.get("filename") or "")
        try:
            length = int(data.get("length") or 0)
        except ValueError:
            length = 0
        if not filename or not 0 < length <= MAX_UPLOAD_BYTES:
            return _error("invalid_arguments")
        with self.lock:
            file_id = f"F{next(self._file_ids):010d}"
            alt = data.get("alt_txt")
            self.files[file_id] = UploadedFile(file_id, filename, length, alt_txt=alt)
        upload_url = f"{self.url}/upload/v1/{file_id}"
        return JSONResponse({"ok": True, "upload_url": upload_url, "file_id": file_id})

    async def _upload(self, request: Request) -> Response:
        """The upload URL: the file's raw bytes as the body (whatever Content-Type urllib sets);
        answered `OK - <bytes>` as files.slack.com does."""
        body = await request.body()
        self.record(request, body, {})
        file_id = request.path_params["file_id"]
        with self.lock:
            found = self.files.get(file_id)
            if found is None or found.completed:
                return Response("Not Found", status_code=404)
            found.data = body
        return Response(f"OK - {len(body)}", media_type="text/plain")

    def _complete_upload(self, data: dict[str, Any]) -> JSONResponse:
        raw = data.get("files")
        try:
            listed = strict_loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            return _error("invalid_arguments")
        if not isinstance(listed, list) or not listed:
            return _error("invalid_arguments")
        channel = None
        if data.get("channel_id") or data.get("channels"):
            target = str(data.get("channel_id") or str(data.get("channels")).split(",")[0])
            channel = self._resolve_channel(target)
            if channel is None:
                return _error("channel_not_found")
        thread_ts = str(data["thread_ts"]) if data.get("thread_ts") else None
        parent = self.messages.get((channel, thread_ts)) if channel and thread_ts else None
        if thread_ts and parent is None:
            return _error("invalid_thread_ts")
        with self.lock:
            files = []
            for entry in listed:
                found = self.files.get(str((entry or {}).get("id", "")))
                if found is None or found.completed:
                    return _error("file_not_found")
                if found.data is None or len(found.data) != found.length:
                    return _error("file_upload_size_mismatch")
                files.append((found, entry))
            for found, entry in files:
                found.completed = True
                found.title = entry.get("title") or found.filename
                found.channel, found.thread_ts = channel, thread_ts
                found.initial_comment = data.get("initial_comment")
            infos = [found.info() for found, _ in files]
            if channel is not None:
                ts = f"{int(time.time())}.{next(self._ts):06d}"
                text = str(data.get("initial_comment") or "")
                share = Message(channel, ts, text, [], thread_ts=thread_ts, files=infos)
                if parent is not None:
                    parent.thread.append(share)
                else:
                    self.messages[(channel, ts)] = share
        return JSONResponse({"ok": True, "files": infos})

    def _post_ephemeral(self, data: dict[str, Any]) -> JSONResponse:
        channel = self._resolve_channel(str(data.get("channel", "")))
        if channel is None:
            return _error("channel_not_found")
        if not data.get("user"):
            return _error("user_not_in_channel")
        with self.lock:
            self.ephemeral.append(dict(data))
        return JSONResponse({"ok": True, "message_ts": f"{int(time.time())}.{next(self._ts):06d}"})


def _in_window(message: Message, data: dict[str, Any]) -> bool:
    """Slack's `oldest` / `latest` bounds (exclusive unless `inclusive`), when given."""
    inclusive = str(data.get("inclusive", "")).lower() in ("true", "1")
    ts = float(message.ts)
    oldest, latest = data.get("oldest"), data.get("latest")
    if oldest and (ts < float(oldest) or (ts == float(oldest) and not inclusive)):
        return False
    return not (latest and (ts > float(latest) or (ts == float(latest) and not inclusive)))


def _error(error: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"ok": False, "error": error, **extra})


def button_click(
    message: Message, action_id: str, user: str, signing_secret: str, at: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """The signed, form-encoded `block_actions` request Slack sends when a button is clicked."""
    from urllib.parse import urlencode

    from slack_sdk.signature import SignatureVerifier

    button = next(
        element
        for block in message.blocks
        if block["type"] == "actions"
        for element in block["elements"]
        if element["action_id"] == action_id
    )
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "team_id": "T0001"},
        "api_app_id": "A0001",
        "team": {"id": "T0001", "domain": "acme"},
        "container": {"type": "message", "message_ts": message.ts, "channel_id": message.channel},
        "channel": {"id": message.channel, "name": "llm-oncall"},
        "message": {"ts": message.ts, "text": message.text, "blocks": message.blocks},
        "response_url": "https://hooks.slack.com/actions/T0001/1/abc",
        "trigger_id": "1.2.3",
        "actions": [
            {
                "type": "button",
                "action_id": button["action_id"],
                "block_id": "incident_actions",
                "value": button["value"],
                "text": button["text"],
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    body = urlencode({"payload": json.dumps(payload)})
    timestamp = str(int(at if at is not None else time.time()))
    signature = SignatureVerifier(signing_secret).generate_signature(timestamp=timestamp, body=body)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature or "",
    }
    return body.encode(), headers
