"""The serve verb: an OpenAI-compatible HTTP server with a web page."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from . import check_at_least


def serve_arguments(p) -> None:
    from ..serve.settings import ServeSettings

    from .generation import ADAPTER_HELP, speculative_args

    d = ServeSettings()
    p.add_argument("--model", default=None, help="model directory (default: the embedded shapes-tiny model)")
    p.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    p.add_argument("--model-id", default=None, help="the name clients use (default: the directory's name)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or int8 (CPU; default: as saved)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"requests decoded together (default: {d.max_batch})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting beyond the batch; past it clients get 429 (default: {d.max_queue})")
    p.add_argument("--api-key", default=os.environ.get("TOKENLOOM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $TOKENLOOM_API_KEY, else none)")
    p.add_argument("--preview-rows", type=int, default=d.preview_rows,
                   help=f"streamed chat: a preview of a drawn image every N code rows, 0 for none "
                        f"(default: {d.preview_rows})")
    p.add_argument("--max-candidates", type=int, default=d.max_candidates,
                   help=f"reranked draws per generated image at most (default: {d.max_candidates})")
    p.add_argument("--max-tokens", type=int, default=None, help="bound on a request's max_tokens "
                   "(default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default: {d.max_body_bytes})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    speculative_args(p)


def _settings(args):
    from ..serve.settings import ServeSettings

    check_at_least(args, "max_batch", "max_candidates", "max_body_bytes", "max_tokens", "threads")
    check_at_least(args, "max_queue", "preview_rows", low=0)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    if args.speculative_window is not None:
        from ..engine.speculative import check_speculative

        check_speculative("jacobi", args.speculative_window, "above", "--speculative-window")
    if args.api_key is not None and not args.api_key.strip():
        args.api_key = None
    return ServeSettings(model=args.model, adapter=args.adapter, model_id=args.model_id, device=args.device,
                         dtype=args.dtype, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                         preview_rows=args.preview_rows, max_candidates=args.max_candidates,
                         max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
                         speculative=args.speculative, speculative_window=args.speculative_window)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args) -> int:
    from ..adapters import ADAPTER_CONFIG, is_adapter_dir
    from ..pipeline import CONFIG_NAME, torch_device, torch_dtype
    from ..serve import create_app
    from ..serve.runner import bind_socket, uvicorn_server

    settings = _settings(args)
    # What can be checked before listening is checked now: a bad flag exits 2 at once, not after a load.
    torch_device(settings.device)
    torch_dtype(settings.dtype, int8=True)
    if settings.model is not None:
        path = Path(settings.model)
        if not path.is_dir():
            raise FileNotFoundError(f"no model directory at {path}")
        if not (path / CONFIG_NAME).exists() and not is_adapter_dir(path):
            raise FileNotFoundError(f"{path / CONFIG_NAME} is missing: not a tokenloom model directory")
    if settings.adapter is not None and not (Path(settings.adapter) / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{Path(settings.adapter) / ADAPTER_CONFIG} is missing: not a LoRA adapter directory")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not _loopback(args.host) and settings.api_key is None:
        print(f"tokenloom serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    app = create_app(settings)
    server = uvicorn_server(app, args.log_level)
    failure = []

    def fatal(error):  # the model did not load: stop serving, report it as the verb's error
        failure.append(error)
        server.should_exit = True

    app.state.worker.on_fatal = fatal
    shown = f"[{host}]" if ":" in host else host
    print(f"tokenloom serve: http://{shown}:{port}/ (model {app.state.worker.model_id}; loading, "
          f"GET /health says when ready)", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        error = failure[0]
        if isinstance(error, (ValueError, OSError)):
            raise error
        raise ValueError(f"cannot load the model: {type(error).__name__}: {error}")
    return 0
