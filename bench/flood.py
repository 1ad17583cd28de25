#!/usr/bin/env python3
"""Connection floods for bench/load.sh's hostile mix (issue 20): from one client, COUNT
connections of each kind held open against the gateway, each opened again as soon as the
gateway closes it, for SECONDS:

- preface: the HTTP/2 connection preface and an empty SETTINGS frame, then nothing;
- silent: a TCP connection that sends nothing;
- keepalive: one `GET /healthz` over HTTP/1.1, then nothing (an idle keep-alive connection).

Whatever the gateway sends is read and never answered. Prints one line at the end:
`FLOOD opened=N closed_by_gateway=M refused=R` (R: connects that failed).

Usage: flood.py HOST PORT COUNT SECONDS
"""

import asyncio
import resource
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
FIRST = {
    "preface": PREFACE,
    "silent": b"",
    "keepalive": b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n",
}
counts = {"opened": 0, "closed_by_gateway": 0, "refused": 0}


async def hold(host, port, kind, until):
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(0.05)
            continue
        counts["opened"] += 1
        try:
            if FIRST[kind]:
                writer.write(FIRST[kind])
                await writer.drain()
            while loop.time() < until:
                left = until - loop.time()
                data = await asyncio.wait_for(reader.read(4096), timeout=max(left, 0.01))
                if not data:
                    counts["closed_by_gateway"] += 1
                    break
        except asyncio.TimeoutError:
            pass
        except OSError:
            counts["closed_by_gateway"] += 1
        finally:
            writer.close()


async def main():
    host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    # One descriptor per connection held: raise this process's soft limit as far as it goes.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(
        *(hold(host, port, kind, until) for kind in FIRST for _ in range(count))
    )
    print("FLOOD " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


asyncio.run(main())
