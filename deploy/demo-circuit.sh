#!/usr/bin/env bash
# Acts as the platform's manager against a coordinator: registers a kernel address
# (POST /v2/conf), creates a circuit (GET /v2/proxy/auth) under one request ID, follows
# the worker's /setup redirect (permit cookie), then sends a request through the new
# circuit with the same ID. The "app" is the worker's own admin endpoint (/health);
# a single node prints the command with its own addresses when it starts.
#
#   deploy/demo-circuit.sh [coordinator-url] [api-secret] [app-host:port]
set -euo pipefail
COORD="${1:-http://127.0.0.1:10200}"
SECRET="${2:-change-me-api-secret}"
APP="${3:-127.0.0.1:10202}"
ID="demo-$(date +%s)"
SESSION="$(cat /proc/sys/kernel/random/uuid)"
USER_ID="$(cat /proc/sys/kernel/random/uuid)"
jar="$(mktemp)"; answer="$(mktemp)"; trap 'rm -f "$jar" "$answer"' EXIT
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

echo "request ID: $ID"
token="$(curl -fsS -X POST "$COORD/v2/conf" -H "X-BackendAI-Token: $SECRET" \
  -H 'Content-Type: application/json' -H "X-Backend-Request-ID: $ID" \
  -d "{\"login_session_token\":null,\"kernel_host\":\"${APP%:*}\",\"kernel_port\":${APP##*:},
       \"session\":{\"id\":\"$SESSION\",\"user_uuid\":\"$USER_ID\",\"group_id\":\"$USER_ID\",
                    \"access_key\":\"AKDEMO\",\"domain_name\":\"default\"}}" | field token)"
echo "token:      $token"
setup="$(curl -fsS "$COORD/v2/proxy/auth?token=$token&session_id=$SESSION&app=demo&protocol=http&redirect=/health" \
  -H 'Accept: application/json' -H "X-Backend-Request-ID: $ID" | field redirect_url)"
echo "setup URL:  $setup"
app_url="$(curl -fsS -o /dev/null -c "$jar" -w '%{redirect_url}' -H "X-Backend-Request-ID: $ID" "$setup")"
echo "app URL:    $app_url"
echo
# The answer is shown whatever it is; one that is not a success fails the script.
curl -sS -i -b "$jar" -H "X-Backend-Request-ID: $ID" "$app_url" > "$answer"
cat "$answer"; echo
head -n 1 "$answer" | grep -q '^HTTP/[0-9.]* 2' || { echo "the app's answer is no success" >&2; exit 1; }
echo "every log line of this flow carries request_id $ID (coordinator, each core's deployment, the access line)"
