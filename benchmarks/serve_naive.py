"""The naive reference server that benchmarks/serve.py compares `tandem serve` with.

    python benchmarks/serve_naive.py BUNDLE [--port 8001] [--host 127.0.0.1]

What a user writes first: FastAPI + PyTorch eager, one request per forward pass, JSON tensors. It loads
the bundle's weights.safetensors into the tandem model (the manifest's config, as `tandem export`
built it) and answers the Open Inference Protocol's JSON infer request, so that one load generator
drives both servers:

    POST /v2/models/{model}/infer  {"inputs": [{"name", "shape", "datatype", "data"}]}
    -> {"model_name", "outputs": [{"name": "logits", "shape", "datatype": "FP32", "data": [...]}]}

Served by uvicorn, one worker, access log off. The forward pass runs in the handler (an `async def`; a
thread pool on top only adds contention) under torch.no_grad, with one torch thread (--threads): on the
2 cores here, at batch 1, that is as fast as torch's default of one thread per core (934 against 967
req/s, 64 clients, quiet machine) with half the CPU, and it does not collapse when another process
takes a core (the default's OpenMP threads then wait for each other: 23 req/s against 953 measured
side by side). So the reference is the stronger of the two, and steady. GET /v2/health/ready answers
200 once the model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from safetensors.torch import load_file

from tandem.bundle import read_manifest
from tandem.config import TrainConfig
from tandem.train.models import build_model


def create_app(bundle: Path) -> FastAPI:
    manifest = read_manifest(bundle)
    cfg = TrainConfig.model_validate(manifest["config"])
    model = build_model(cfg, len(manifest["labels"]), load_file(str(bundle / "weights.safetensors")))
    name = manifest["name"]
    output = manifest["outputs"][0]["name"]
    app = FastAPI(title="naive reference server")

    @app.get("/v2/health/ready")
    async def ready():
        return {}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request):
        if model_name != name:
            return JSONResponse({"error": f"unknown model {model_name}"}, status_code=404)
        body = await request.json()
        tensor = body["inputs"][0]
        x = torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])
        with torch.no_grad():
            logits = model(x)
        return {"model_name": name, "outputs": [{"name": output, "shape": list(logits.shape), "datatype": "FP32",
                                                 "data": logits.flatten().tolist()}]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.bundle), host=args.host, port=args.port, workers=1, access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
