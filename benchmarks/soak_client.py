"""The client process that benchmarks/soak.py kills mid-stream ("a client restarted mid-stream").

It POSTs the JSON body read from stdin to the URL given as its argument, writes
`status: <HTTP status>` as its first line, then copies the response's lines (server-sent
events) to stdout as they arrive, until the response ends or the process is killed. The Bearer
key, if any, comes from $MOE_SERVE_API_KEY. Standard library only, so that it starts fast.

    python -m benchmarks.soak_client http://127.0.0.1:8000/v1/chat/completions < body.json
"""

from __future__ import annotations

import http.client
import os
import sys
from urllib.parse import urlsplit

API_KEY_ENV = "MOE_SERVE_API_KEY"
TIMEOUT_S = 60.0
STATUS_PREFIX = "status: "


def stream_lines(url: str, body: bytes) -> int:
    """Copy the response lines of POST `url` to stdout; 0 when the status was 200, else 1."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", parts.path or "/", body=body, headers=headers)
        response = connection.getresponse()
        sys.stdout.buffer.write(f"{STATUS_PREFIX}{response.status}\n".encode())
        sys.stdout.buffer.flush()
        for line in response:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
        return 0 if response.status == 200 else 1
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(stream_lines(sys.argv[1], sys.stdin.buffer.read()))
