"""The `normalcy serve` command: its options and how it starts the service.

Torch-free, so that exported models are served (`--runtime onnx|openvino`) where only
'normalcy[runtime,serve]' is installed; the launcher runs it alone when torch is absent.
"""

from __future__ import annotations

import argparse
import os
import sys

from normalcy import runtime

SHUTDOWN_S = 10  # on SIGTERM, requests in flight get this long, then are cancelled


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """The `serve` subcommand and its options, on a parser's subcommands."""
    serve = sub.add_parser(
        "serve", help="HTTP service and web page for saved models (token: $NORMALCY_TOKEN)"
    )
    serve.add_argument("models", nargs="+", metavar="MODEL_DIR", help="a model folder or NAME=DIR")
    serve.add_argument(
        "--runtime",
        choices=["torch", "onnx", "openvino"],
        default="torch",
        help="torch: model folders of `normalcy fit`; onnx (onnxruntime) or openvino: folders "
        "of `normalcy export` (default: torch)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--weights", default=None, help="backbone weights file to use")
    serve.add_argument(
        "--device",
        default="auto",
        help="where --runtime torch models run, as for predict (auto, cpu, cuda, cuda:N, mps)",
    )
    serve.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="arithmetic: --runtime torch as fitted unless named (auto: bfloat16 where the "
        "device has bfloat16 instructions); --runtime openvino float32 (default, scores as the "
        "library's) or bfloat16 (faster on CPUs with bfloat16 instructions); onnx: float32",
    )
    serve.add_argument("--max-upload-mb", type=float, default=20, help="largest upload accepted")
    serve.add_argument(
        "--max-megapixels", type=float, default=40, help="largest image accepted (pixels / 1e6)"
    )
    serve.add_argument(
        "--max-request-mb",
        type=float,
        default=64,
        help="largest request body; refused from its Content-Length, never read past",
    )
    serve.add_argument(
        "--max-request-megapixels",
        type=float,
        default=100,
        help="most pixels of all images of one request (pixels / 1e6)",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=30,
        help="seconds a request body may stall; all of it must arrive within this plus 1 s "
        "per 16 KiB (408)",
    )
    serve.add_argument("--max-batch", type=int, default=8, help="images scored together")
    serve.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="connections and requests at once; beyond it answer 503",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the service answers besides its address (repeat; '*': any), "
        "e.g. the name a reverse proxy forwards",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a web origin (https://example.com) allowed to post to the service (repeat)",
    )
    serve.add_argument(
        "--max-delay-ms", type=float, default=10, help="wait this long to fill a batch"
    )
    serve.add_argument(
        "--max-queue", type=int, default=64, help="images waiting; beyond it answer 503"
    )
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Start the service on the models named in `args`."""
    try:
        import uvicorn

        from normalcy.server import ServiceSettings, create_app, parse_model_arg
        from normalcy.server.guard import allowed_hosts
    except ImportError as error:
        raise RuntimeError(
            f"normalcy serve needs the service extras ({error.name} is missing): "
            "pip install 'normalcy[serve]'"
        ) from None
    named = [parse_model_arg(argument) for argument in args.models]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}; use NAME=DIR to rename")
    models = {}
    for name, folder in named:
        if args.runtime == "torch":
            from normalcy.detector import Detector  # the library: torch

            models[name] = Detector.load(
                folder, weights=args.weights, device=args.device, precision=args.precision
            )
        else:
            engine = "onnxruntime" if args.runtime == "onnx" else args.runtime
            models[name] = runtime.load(folder, engine, args.precision or "float32")
        print(f"loaded {name} from {folder}", file=sys.stderr)
    settings = ServiceSettings(
        token=os.environ.get("NORMALCY_TOKEN") or None,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000),
        max_request_pixels=int(args.max_request_megapixels * 1_000_000),
        read_timeout=args.read_timeout,
        max_batch=args.max_batch,
        max_delay=args.max_delay_ms / 1000,
        max_queue=args.max_queue,
        hosts=allowed_hosts(args.host, args.allowed_host),
        origins=tuple(args.allowed_origin),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        print(
            f"warning: listening on {args.host} without NORMALCY_TOKEN: anyone who can reach "
            "this port can use the service",
            file=sys.stderr,
        )
    uvicorn.run(
        create_app(models, settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        limit_concurrency=args.max_connections,  # beyond it: 503 at once
        timeout_graceful_shutdown=SHUTDOWN_S,
    )
    return 0
