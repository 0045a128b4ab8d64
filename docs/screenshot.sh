#!/usr/bin/env bash
# Regenerate docs/incident-in-temporal-ui.png and docs/incidents-list-in-temporal-ui.png.
# Run from the repo root. Needs: apt-get install -y chromium; the .venv (pagerloop, temporal, websockets).
# Chromium's own --screenshot never finishes on the Temporal UI with --virtual-time-budget (the UI keeps
# polling) and is blank without it, so the shots go through the DevTools protocol after a real wait.
set -euo pipefail
repo=$(pwd); bin=$repo/.venv/bin; out=$repo/docs
export PAGERLOOP_API_PORT=18080 PAGERLOOP_TEMPORAL_ADDRESS=127.0.0.1:17233 \
       PAGERLOOP_TEMPORAL_UI_PORT=18233 PAGERLOOP_DETECTOR_INTERVAL_SECONDS=2
ui=http://127.0.0.1:18233; cdp=19222
tmp=$(mktemp -d); dev=; chrome=
cleanup() {
  [ -n "$chrome" ] && kill -- -"$chrome" 2>/dev/null || true
  [ -n "$dev" ] && { kill -INT -- -"$dev" 2>/dev/null || true; sleep 5; }
  rm -rf "$tmp"
}
trap cleanup EXIT

# The whole dev stack (Temporal dev server + UI, API, worker, detector) in a temp dir.
(cd "$tmp" && exec setsid "$bin/pagerloop" dev > dev.log 2>&1) & dev=$!
until curl -sf localhost:18080/healthz >/dev/null && curl -sf -o /dev/null $ui; do sleep 1; done

# 50 failed calls -> the detector opens an incident within a few seconds.
"$bin/python" -c 'import json;print(json.dumps({"calls":[{"model":"gpt-4.1","status":"server_error","latency_ms":700}]*50}))' \
  | curl -sf -X POST localhost:18080/v1/llm-calls -H 'content-type: application/json' -d @- ; echo
id=
until [ -n "$id" ]; do
  sleep 2
  id=$("$bin/temporal" workflow list --address "$PAGERLOOP_TEMPORAL_ADDRESS" --query 'WorkflowType="IncidentWorkflow"' -o json \
       | "$bin/python" -c 'import json,sys;r=json.load(sys.stdin);print(r[0]["execution"]["workflowId"] if r else "")')
done
echo "incident: $id"
"$bin/pagerloop" incidents ack "$id" --user alice --note "looking"
"$bin/pagerloop" incidents note "$id" "OpenAI status page shows elevated errors" --user alice
sleep 3

(exec setsid chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1300 \
  --remote-debugging-port=$cdp --user-data-dir="$tmp/chrome" about:blank > "$tmp/chrome.log" 2>&1) & chrome=$!
until curl -sf localhost:$cdp/json/version >/dev/null; do sleep 0.5; done

shot() {  # shot URL FILE: open URL in a new tab at 1600x1300, wait 8 s, save a PNG
  "$bin/python" - "$1" "$2" <<EOF
import asyncio, base64, json, sys, urllib.request, websockets
url, out = sys.argv[1], sys.argv[2]
tab = json.load(urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:$cdp/json/new?about:blank", method="PUT")))
async def main():
    async with websockets.connect(tab["webSocketDebuggerUrl"], max_size=None) as ws:
        async def call(i, method, **params):
            await ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while (msg := json.loads(await ws.recv())).get("id") != i: pass
            return msg.get("result", {})
        await call(1, "Emulation.setDeviceMetricsOverride", width=1600, height=1300, deviceScaleFactor=1, mobile=False)
        await call(2, "Page.navigate", url=url)
        await asyncio.sleep(8)
        open(out, "wb").write(base64.b64decode((await call(3, "Page.captureScreenshot", format="png"))["data"]))
asyncio.run(main())
EOF
  echo "wrote $2"
}
shot "$ui/namespaces/default/workflows/$id" "$out/incident-in-temporal-ui.png"
shot "$ui/namespaces/default/workflows?query=IncidentStatus%3D%22acknowledged%22" "$out/incidents-list-in-temporal-ui.png"
