"""`tandem train` and `tandem config`."""

from __future__ import annotations

import os

from tandem.cli.args import log_for, print_json
from tandem.errors import UserError
from tandem.threads import apply_to_torch, choose


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config",
                       description="Train a model. With no arguments: the default cnn on the embedded animals.",
                       epilog="examples:  tandem train  |  tandem train run.yaml optim.lr=0.01  |  "
                              "tandem train data.source=photos/ data.channels=3 model.name=resnet  |  "
                              "tandem train --resume runs/latest  |  torchrun --nproc-per-node 2 -m tandem train "
                              "parallel.strategy=ddp (or local-sgd, tensor, pipeline).  `tandem config` lists every "
                              "key. Each run "
                              "gets its own folder runs/<date>-<time> (runs/latest links to the newest) unless "
                              "out_dir=... names one.")
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config file, then dotted overrides such as optim.lr=0.01")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its newest good checkpoint "
                   "(under torchrun: the same process count and strategy); overrides may change only progress, "
                   "checkpoint_every, keep_checkpoints, device, compile, data.workers, data.stream, parallel.timeout and threads.*")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout (logs go to stderr)")
    p.set_defaults(func=cmd_train)


def register_config(sub) -> None:
    p = sub.add_parser("config", help="list every config key with its default, or resolve a config",
                       description="With no arguments: every key, default and meaning. With [CONFIG.yaml] "
                                   "key=value...: the resolved, validated config as YAML.")
    p.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] key=value")
    p.add_argument("--json", action="store_true", help="the key list as JSON")
    p.set_defaults(func=cmd_config)


def cmd_train(args) -> int:
    from tandem.config import load_config

    config_file = None
    overrides = list(args.settings)
    if overrides and "=" not in overrides[0]:
        config_file = overrides.pop(0)
    resume = args.resume
    if args.resume:
        from tandem.train.runs import resume_config

        if config_file:
            raise UserError("--resume takes its config from the run folder; give key=value overrides only")
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(config_file, overrides)
        if _restarted():
            # torchrun --max-restarts started this process again after a rank failed: continue the run
            # in out_dir from its newest checkpoint instead of refusing the folder the first attempt made.
            from tandem.train.runs import resume_config, started_by_this_job

            if not cfg.out_dir:
                raise UserError("torchrun restarted the job, but out_dir is not set, so there is no run to continue; "
                                "give out_dir=... to jobs started with --max-restarts")
            if started_by_this_job(cfg.out_dir):  # not a folder some other run had filled before this job
                resume = cfg.out_dir
                cfg = resume_config(cfg.out_dir, [])  # the same command: the run's own config
    apply_to_torch(choose("torch", cfg.threads.count, cfg.threads.wait))  # before torch is imported
    from tandem.train.loop import train

    result = train(cfg, resume=bool(resume), log=log_for(args))
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        print_json({**result.metrics, "run_dir": str(result.run_dir)})
    return 0


def _restarted() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def cmd_config(args) -> int:
    from tandem.config import describe_keys, dump_config, load_config

    if args.settings:
        config_file = args.settings[0] if "=" not in args.settings[0] else None
        overrides = args.settings[1:] if config_file else args.settings
        print(dump_config(load_config(config_file, overrides)), end="")
        return 0
    rows = describe_keys()
    if args.json:
        print_json([{"key": k, "default": d, "description": t} for k, d, t in rows])
        return 0
    for key, default, text in rows:
        print(f"{key:<24} {default!s:<14} {text}")
    return 0
