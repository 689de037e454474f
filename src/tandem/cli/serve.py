"""`tandem serve` and `tandem client`."""

from __future__ import annotations

from tandem.cli.args import counted, positive_float, positive_int
from tandem.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP (Open Inference Protocol v2)",
                       description="Serve REPO/<model>/<version>/ bundles over the Open Inference Protocol v2 "
                                   "(tritonclient, KServe clients, curl), with /v1/models/<m>/classify for encoded "
                                   "images, feedback, /metrics and a web page at /. Never imports torch.",
                       epilog="tokens come from the environment: TANDEM_TOKEN (inference; when set, inference needs "
                              "it) and TANDEM_ADMIN_TOKEN (load/unload models, read feedback). Every setting: "
                              "`tandem serve --help-config`.")
    p.add_argument("repo", nargs="?", help="the model repository: REPO/<model>/<version>/ bundle folders")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=counted(0, 65535), help="port (default 8000)")
    p.add_argument("--config", metavar="serve.yaml", help="serve settings (batching, versions, auth, store, limits)")
    p.add_argument("--store", metavar="URL", help="prediction and feedback store: a SQLite path or postgresql://... "
                   "(default: tandem-serve.sqlite here)")
    p.add_argument("--help-config", action="store_true", help="list every serve setting with its default, and exit")
    p.add_argument("--write-triton-config", action="store_true",
                   help="write REPO/<model>/config.pbtxt for Triton from the serve settings, and exit")
    p.add_argument("--force", action="store_true", help="with --write-triton-config: replace configs tandem did not write")
    p.set_defaults(func=cmd_serve)


def register_client(sub) -> None:
    p = sub.add_parser("client", help="classify images on a tandem server (what a device runs)",
                       description="Send image files (folders searched recursively) to a `tandem serve` server and "
                                   "print the top classes. Needs no torch, no ONNX Runtime.")
    p.add_argument("url", help="the server, e.g. http://192.168.1.5:8000 (http:// may be left out)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--model", help="model name (default: the server's only model)")
    p.add_argument("--version", type=positive_int, help="model version (default: the latest)")
    p.add_argument("--top-k", type=positive_int, default=1, help="classes per image (default: %(default)s)")
    p.add_argument("--token", help="inference token (default: $TANDEM_TOKEN)")
    p.add_argument("--feedback", metavar="LABEL", help="also send LABEL as the true label of every image")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON Lines: {path, prediction_id, model, version, top_k}")
    p.set_defaults(func=cmd_client)


def cmd_serve(args) -> int:
    from tandem.serve.config import describe_serve_keys, load_serve_config

    if args.help_config:
        for key, default, text in describe_serve_keys():
            print(f"{key:<32} {default!s:<30} {text}")
        return 0
    if not args.repo:
        raise UserError("give the model repository: tandem serve REPO (folders REPO/<model>/<version>/)")
    config = load_serve_config(args.config, {"host": args.host, "port": args.port})
    if args.store is not None and not args.store.strip():
        raise UserError("--store is empty; give a SQLite file path or postgresql://user@host:port/db")
    if args.store:
        config = config.model_copy(update={"store": config.store.model_copy(update={"url": args.store})})
    if args.write_triton_config:
        from tandem.bundle import read_manifest
        from tandem.serve.repository import Repository
        from tandem.serve.triton import write_triton_config

        repository = Repository(args.repo, config)
        for name in repository.names_on_disk():
            repository.wanted_versions(name)  # the versions the policy names exist
            latest = repository.wanted_versions(name, "all")[-1]
            batching = config.batching_for(name)
            path = write_triton_config(args.repo, name, read_manifest(f"{args.repo}/{name}/{latest}", verify=False),
                                       max_batch_size=batching.max_batch_size, dynamic_batching=batching.enabled,
                                       max_queue_delay_ms=batching.max_queue_delay_ms,
                                       versions=config.model(name).versions, force=args.force)
            print(f"wrote {path}")
        return 0
    from tandem.serve.app import serve

    serve(args.repo, config)
    return 0


def cmd_client(args) -> int:
    from tandem.serve.client import run_client

    return run_client(args.url, args.images, model=args.model, version=args.version, top_k=args.top_k,
                      token=args.token, as_json=args.json, feedback_label=args.feedback, timeout=args.timeout)
