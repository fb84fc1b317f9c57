#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the end-to-end tests, without generated code.

serve: answers /sidelane.Echo/Who with JSON naming the pod and version, and
       /sidelane.Echo/Fail with the status code named in the request (e.g. UNAVAILABLE).
call:  calls a method COUNT times and prints one JSON line per call: the status code, the
       JSON the server answered, and the response's initial metadata.
"""
import argparse
import json
import sys
import time
from concurrent import futures

import grpc

SERVICE = "sidelane.Echo"


def serve(args):
    identity = {"pod": args.pod, "version": args.version}

    def who(request, context):
        seen = dict(context.invocation_metadata())
        return json.dumps({**identity, "metadata": seen}).encode()

    def fail(request, context):
        code = getattr(grpc.StatusCode, request.decode() or "UNAVAILABLE")
        context.abort(code, f"{args.pod} was told to fail")

    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"[::]:{args.port}")
    server.start()
    print(json.dumps({"event": "serving", "port": args.port}), flush=True)
    server.wait_for_termination()


def call(args):
    metadata = [tuple(m.split("=", 1)) for m in args.metadata]
    with grpc.insecure_channel(args.target) as channel:
        method = channel.unary_unary(f"/{SERVICE}/{args.method}")
        for _ in range(args.count):
            start = time.monotonic()
            try:
                reply, rpc = method.with_call(
                    args.body.encode(), metadata=metadata, timeout=args.timeout
                )
                line = {"code": "OK", "reply": json.loads(reply)}
            except grpc.RpcError as e:
                rpc = e
                line = {"code": e.code().name, "details": e.details()}
            line["initial_metadata"] = dict(rpc.initial_metadata() or ())
            line["ms"] = round((time.monotonic() - start) * 1000)
            print(json.dumps(line), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--pod", required=True)
    s.add_argument("--version", default="v1")
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--method", default="Who")
    c.add_argument("--body", default="")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--metadata", action="append", default=[])
    c.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args()
    serve(args) if args.cmd == "serve" else call(args)


if __name__ == "__main__":
    sys.exit(main())
