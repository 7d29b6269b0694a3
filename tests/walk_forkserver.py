"""A fork server for the docs walk (tests/test_docs_walk.py): `wiola` commands without the import cost.

Every `wiola` command starts by importing torch, transformers and wiola, seconds of CPU each time; the docs
run dozens. `python walk_forkserver.py serve SOCKET` imports them once (`wiola.cli.build_parser()` imports
every command's module), then forks one child per connection. The `wiola` that the walk puts on PATH is
`python -S walk_forkserver.py SOCKET ARGS...`: it sends its arguments, working directory, environment and
its standard input, output and error (the file descriptors themselves) to the server, and exits with the
child's status. The child takes them over and runs `wiola.cli.main(ARGS)`, exactly what the console script
runs. Signals sent to the client (SIGTERM, SIGINT) are passed on to the child, so a `wiola serve` in the
background stops as it would. The server does no tensor work before it forks, so no thread pool is copied.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size = int.from_bytes(data[:8], "big")
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the client went away")
        body += chunk
    return json.loads(body), fds


def _child(conn: socket.socket) -> int:
    request, fds = _read_request(conn)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; the command's subprocesses need it
    conn.sendall(f"{os.getpid()}\n".encode())
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    from wiola.cli import main

    sys.argv = ["wiola", *request["argv"]]
    try:
        status = main(request["argv"])
    except SystemExit as exc:  # argparse errors and --help
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # what the console script would print as a traceback
        import traceback

        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    _record_cpu()
    conn.sendall(f"{status}\n".encode())
    return status


def _record_cpu() -> None:
    """Add this command's CPU seconds (its own and its finished subprocesses') to SOCKET.cpu, for the walk's report."""
    import resource

    seconds = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))
    with open(CPU_LOG, "a") as f:
        f.write(f"{seconds:.3f}\n")


CPU_LOG = ""


def serve(path: str) -> None:
    global CPU_LOG
    from wiola.cli import build_parser

    CPU_LOG = path + ".cpu"

    build_parser()  # imports every command's module
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            sys.exit(_child(conn))  # a normal exit: the command's atexit handlers run
        conn.close()


def client(path: str, argv: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [len(body).to_bytes(8, "big")], [0, 1, 2])
    conn.sendall(body)
    replies = conn.makefile("rb")
    pid = int(replies.readline())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
    line = replies.readline()
    return int(line) if line.strip() else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
