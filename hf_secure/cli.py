"""The ``hf-secure`` command line.

    hf-secure convert permute SRC --out DIR --key-out KEYFILE [--embeddings client|server]
    hf-secure convert approximate SRC --out DIR [--gelu quad|secformer] [--softmax 2quad|exact]
    hf-secure serve DIR --port P [--protocol he] [--token-file FILE | --no-auth] [--ssl-certfile CERT --ssl-keyfile KEY]
    hf-secure public DIR --out PUBLIC
    hf-secure party-keys --out DIR
    hf-secure party --role server0|server1|dealer|owner --model DIR --rendezvous tcp://HOST:PORT [--protocol fss]
    hf-secure keys import KEYFILE | keys list | keys remove FINGERPRINT
    hf-secure generate DIR --prompt TEXT [--key KEYFILE] [--server-url URL [--ca-bundle PEM]]
    hf-secure push DIR REPO_ID
    hf-secure audit DIR [--original SRC] [--text FILE] [--layers 0,1,mid,last] [--json OUT] [--chart OUT.png]
    hf-secure demo

Every failure ends in one line on stderr, ``hf-secure: error: Type: message``, exit status 1
(usage errors: argparse's, status 2); ``-v``/``--verbose``, before or after the command, adds the
traceback and info logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from .errors import HfSecureError, UnknownOptionError


def _convert(args) -> None:
    from .convert import convert_permute

    section = convert_permute(args.src, args.out, args.key_out, embeddings=args.embeddings,
                              permute_internal=not args.no_internal, seed=args.seed, revision=args.revision)
    print(f"converted {args.src} -> {args.out}")
    print(f"client key -> {args.key_out} (fingerprint {section['key_fingerprint']})")
    print("give the key only to clients; `hf-secure serve` needs the folder alone")


def _approximate(args) -> None:
    from .convert import convert_approximate

    def lines(path):
        if path is None:
            return None
        if not Path(path).is_file():
            raise UnknownOptionError(f"text file {path} does not exist: give a file with one sample per line")
        return [line for line in Path(path).read_text().splitlines() if line.strip()]

    section = convert_approximate(args.src, args.out, gelu=args.gelu, softmax=args.softmax,
                                  calibration_text=lines(args.calibration_file), distill_text=lines(args.distill),
                                  distill_epochs=tuple(args.distill_epochs), revision=args.revision)
    print(f"approximated {args.src} -> {args.out}: {json.dumps(section['approximations'], sort_keys=True)[:200]}")


def _serve(args) -> None:
    import torch

    from .hub import resolve_folder
    from .server.access import AccessPolicy
    from .server.app import ServeLimits, serve

    access = AccessPolicy.load(args.token_file)  # bad tokens and options fail before the checkpoint is fetched
    limits = ServeLimits(max_body_bytes=args.max_body_mb << 20, max_concurrent=args.max_concurrent,
                         max_concurrent_per_caller=args.max_concurrent_per_token,
                         max_connections=args.max_connections, head_timeout_s=args.head_timeout)
    if args.protocol == "he":  # an unmodified checkpoint; sessions hold evaluation keys (and encrypted KV caches)
        if args.dtype is not None or args.max_cache_mb is not None:
            raise UnknownOptionError("--dtype and --max-cache-mb do not apply to --protocol he")
        model = {"protocol": "he", "max_sessions": args.max_sessions or 2, "session_ttl_s": args.session_ttl,
                 "answer_timeout_s": args.answer_timeout or 300.0}
    else:
        if args.answer_timeout is not None:
            raise UnknownOptionError("--answer-timeout applies to --protocol he only")
        model = {"dtype": getattr(torch, args.dtype or "float32"), "max_sessions": args.max_sessions or 64,
                 "max_cache_bytes": (args.max_cache_mb or 1024) << 20, "session_ttl_s": args.session_ttl}
    folder = resolve_folder(args.model, revision=args.revision)
    serve(folder, host=args.host, port=args.port, access=access, no_auth=args.no_auth,
          ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, limits=limits,
          shutdown_timeout_s=args.shutdown_timeout, **model)


def _party(args) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig

    from .hub import config_only_folder, refuse_weights, resolve_folder
    from .protocols.mpc.client import load_program, load_weights
    from .protocols.mpc.run import session_party
    from .runtime import Role, join
    from .runtime.secure_link import identity_from_env
    from .server.runtime import read_section

    role = Role[args.role.upper()]
    identity = identity_from_env(int(role), len(Role), args.party_key)  # first: before anything is loaded
    if role == Role.OWNER:
        folder = resolve_folder(args.model, revision=args.revision)
    else:  # servers and dealer: the config only, never the weights
        folder = config_only_folder(args.model, revision=args.revision)
    config = AutoConfig.from_pretrained(folder)
    section = read_section(config, args.model, args.protocol)
    if section["protocol"] != args.protocol:
        how = {"mpc": "hf-secure convert approximate", "fss": "an unmodified checkpoint"}[args.protocol]
        raise UnknownOptionError(f"{folder} is a {section['protocol']} checkpoint, not {args.protocol} ({how})")
    if role != Role.OWNER and not args.allow_weights:
        refuse_weights(folder)
    if args.protocol == "fss":  # an unmodified checkpoint; servers get their device and key folder
        if role not in (Role.SERVER0, Role.SERVER1) and (args.device is not None or args.key_dir is not None):
            raise UnknownOptionError("--device and --key-dir are options of the fss servers")
        from .protocols.fss.client import plain_weights, server_device
        from .protocols.fss.core import Params
        from .protocols.fss.models import program_for
        from .protocols.fss.run import session_party as fss_party

        program = program_for(config, section["family"])
        private = (plain_weights(folder, section["family"]) if role == Role.OWNER
                   else {"device": server_device(args.device), "key_dir": args.key_dir})
        party, extra = fss_party, (program, private, Params())
    else:
        if args.device is not None or args.key_dir is not None:
            raise UnknownOptionError("--device and --key-dir are options of fss parties")
        party, extra = session_party, (load_program(config), load_weights(folder) if role == Role.OWNER else None)
    print(f"{role.name.lower()}: joining {args.rendezvous}", flush=True)
    channel = join(role, args.rendezvous, args.timeout, identity, threads=args.threads)
    try:
        result = party(role, channel, *extra)
    finally:
        dist.destroy_process_group()
    setup = result["stats"].get("setup", {})
    print(f"{role.name.lower()}: session over; setup sent {setup.get('bytes_sent', 0)} bytes", flush=True)


def _party_keys(args) -> None:
    from .runtime import Role
    from .runtime.secure_link import PartyIdentity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for role, identity in zip(Role, PartyIdentity.generate_all(len(Role))):
        identity.save(out / f"{role.name.lower()}.key", role.name.lower())
    print(f"wrote {', '.join(f'{r.name.lower()}.key' for r in Role)} to {out}: give each party (and the client) "
          "only its own file, for this session")


def _public(args) -> None:
    from .hub import write_public_part

    files = write_public_part(args.folder, args.out)
    print(f"wrote the public part of {args.folder} to {args.out}: {', '.join(p.name for p in files)} (no weights)")


def _keys(args) -> None:
    from .keys import KeyStore

    store = KeyStore()
    if args.keys_command == "import":
        print(f"imported {store.import_key(args.file)} into {store.root}")
    elif args.keys_command == "list":
        rows = store.list()
        if not rows:
            print(f"no keys in the key store {store.root} (HF_SECURE_HOME sets its parent folder); "
                  "add one with `hf-secure keys import KEYFILE`")
        for row in rows:
            print(f"{row['fingerprint']}  {row['protocol']}  {row['model']}")
    elif args.keys_command == "remove":
        if not store.remove(args.fingerprint):
            raise HfSecureError(f"no key {args.fingerprint} in {store.root}: "
                                "`hf-secure keys list` shows the stored keys")
        print(f"removed {args.fingerprint}")


def _generate(args) -> None:
    from transformers import pipeline

    from .hub import resolve_folder

    folder = resolve_folder(args.model)  # a bad name fails here, clearly, not inside pipeline()
    generator = pipeline("secure-text-generation", model=folder, key=args.key, server_url=args.server_url,
                         ca_bundle=args.ca_bundle)  # the server token comes from HF_SECURE_TOKEN
    result = generator(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(result[0]["generated_text"])
    print(json.dumps(generator.secure_stats))


def _push(args) -> None:
    from .hub import push_converted

    info = push_converted(args.folder, args.repo_id, private=args.private or None)
    print(f"pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


def _audit(args) -> None:
    from .audit import audit
    from .audit.probe import KINDS

    texts = None
    if args.text is not None:
        try:
            texts = [line.strip() for line in Path(args.text).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UnknownOptionError(f"cannot read --text {args.text}: {exc}") from None
        if not texts:
            raise UnknownOptionError(f"{args.text} holds no text (one sample per line)")
    for option, path in (("--json", args.json), ("--chart", args.chart)):  # before the audit, not after it
        if path is not None and (not Path(path).resolve().parent.is_dir() or Path(path).is_dir()):
            raise UnknownOptionError(f"{option} {path}: not a file in an existing folder")
    if args.chart is not None:
        if Path(args.chart).suffix.lower() != ".png":
            raise UnknownOptionError(f"--chart {args.chart}: the chart is a PNG (name it .png)")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UnknownOptionError("--chart needs matplotlib: pip install 'hf-secure[audit]'") from None
    report = audit(args.model, original=args.original, protocol=args.protocol, texts=texts,
                   layers=args.layers.split(","), views=KINDS if args.views is None else args.views.split(","),
                   key=args.key, embedding_noise=args.embedding_noise, shortlist=args.shortlist, sweeps=args.sweeps,
                   max_length=args.max_length)
    print(report.table())
    if args.json is not None:
        report.to_json(args.json)
        print(f"table -> {args.json}")
    if args.chart is not None:
        report.plot(args.chart)
        print(f"chart -> {args.chart}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens, embeddings=args.embeddings)


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-secure", description="Private inference for transformers models")
    parser.add_argument("-v", "--verbose", action="store_true", help="on failure, show the traceback too")
    # the same flag after any command; SUPPRESS keeps the value given before the command
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="on failure, show the traceback too")

    def command(subparsers, name, **kwargs) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[verbose], **kwargs)

    sub = parser.add_subparsers(dest="command", required=True)

    convert = command(sub, "convert", help="convert a checkpoint for a protocol")
    protocols = convert.add_subparsers(dest="protocol", required=True)
    permute = command(protocols, "permute", help="STIP: permute the hidden dimension")
    permute.add_argument("src", help="local folder or Hub id")
    permute.add_argument("--out", required=True, help="output model folder")
    permute.add_argument("--key-out", required=True, help="client key file (outside the model folder)")
    permute.add_argument("--embeddings", choices=("client", "server"), default="client",
                         help="who holds token embeddings and LM head (default: client)")
    permute.add_argument("--no-internal", action="store_true",
                         help="do not permute FFN units, head order and within-head dimensions")
    permute.add_argument("--seed", type=int, default=None, help="seed (testing only; default: OS randomness)")
    permute.add_argument("--revision", default=None)
    permute.set_defaults(func=_convert)
    approximate = command(protocols, "approximate",
                          help="MPC-friendly checkpoint for the mpc protocol (every family of hf_secure.families)")
    approximate.add_argument("src", help="local folder or Hub id")
    approximate.add_argument("--out", required=True, help="output model folder")
    approximate.add_argument("--gelu", choices=("quad", "secformer"), default=None,
                             help="GeLU replacement (BERT, GPT-2); default: quad with --distill, else secformer")
    approximate.add_argument("--softmax", choices=("2quad", "exact"), default=None,
                             help="default: 2quad with --distill, else exact")
    approximate.add_argument("--calibration-file", default=None,
                             help="text (one sample per line) for the LayerNorm bounds; default: built-in")
    approximate.add_argument("--distill", default=None, metavar="TEXT_FILE",
                             help="distill the approximated model from the original on this text (one sample per line)")
    approximate.add_argument("--distill-epochs", type=int, nargs=2, default=(2, 1), metavar=("STAGE1", "STAGE2"))
    approximate.add_argument("--revision", default=None)
    approximate.set_defaults(func=_approximate)

    serve = command(sub, "serve", help="run the HTTP server for a converted checkpoint (or --protocol he)")
    serve.add_argument("model", help="converted folder or Hub id (--protocol he: an unmodified BERT, GPT-2 or Llama-like checkpoint)")
    serve.add_argument("--protocol", choices=("he",), default=None,
                       help="he: serve an unmodified BERT, GPT-2 or Llama-like checkpoint under CKKS (default: the converted checkpoint's)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default float32")
    serve.add_argument("--token-file", default=None,
                       help="bearer tokens, one NAME:TOKEN per line (also read: HF_SECURE_SERVER_TOKENS)")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve without tokens on a non-loopback address (anyone who reaches the port)")
    serve.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (PEM)")
    serve.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    serve.add_argument("--max-sessions", type=_positive, default=None,
                       help="open sessions per token (default 64; he: 2, each holds its evaluation keys)")
    serve.add_argument("--max-cache-mb", type=_positive, default=None, help="KV cache MiB per token (default 1024)")
    serve.add_argument("--session-ttl", type=_seconds, default=900.0, help="seconds an idle session is kept")
    serve.add_argument("--answer-timeout", type=_seconds, default=None,
                       help="--protocol he: seconds a query waits for the client's refresh answer (default 300)")
    serve.add_argument("--max-body-mb", type=_positive, default=256, help="largest request body, MiB (at most 1024)")
    serve.add_argument("--max-concurrent", type=_positive, default=128, help="requests in flight in all")
    serve.add_argument("--max-concurrent-per-token", type=_positive, default=8, help="requests in flight per token")
    serve.add_argument("--max-connections", type=_positive, default=1024, help="open connections")
    serve.add_argument("--head-timeout", type=_seconds, default=10.0,
                       help="seconds a connection has to send a complete request head")
    serve.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    serve.add_argument("--revision", default=None)
    serve.set_defaults(func=_serve)

    party = command(sub, "party", help="run one party of an mpc or fss session (the client is the user's process)")
    party.add_argument("--role", required=True, choices=("server0", "server1", "dealer", "owner"))
    party.add_argument("--protocol", default="mpc", choices=("mpc", "fss"),
                       help="mpc: a converted checkpoint; fss: a plain one (default: mpc)")
    party.add_argument("--device", default=None, choices=("cpu", "cuda"), help="fss servers: where to compute")
    party.add_argument("--key-dir", default=None, help="fss servers: where the dealer's keys wait until used")
    party.add_argument("--model", required=True,
                       help="servers and dealer: the public part (`hf-secure public`) or its Hub id, of which only "
                            "config.json is read; owner: the folder with the weights")
    party.add_argument("--rendezvous", required=True, metavar="tcp://HOST:PORT",
                       help="where server 0 hosts the rendezvous (the same address for every party)")
    party.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent peer counts as failed")
    party.add_argument("--threads", type=int, default=1)
    party.add_argument("--revision", default=None)
    party.add_argument("--party-key", default=None,
                       help="this role's key file from `hf-secure party-keys` (default: HF_SECURE_PARTY_KEY)")
    party.add_argument("--allow-weights", action="store_true",
                       help="let a server or the dealer read a folder that holds weights (a machine of the owner)")
    party.set_defaults(func=_party)

    keys_cmd = command(sub, "party-keys", help="make one key file per role for an mpc session on several machines")
    keys_cmd.add_argument("--out", required=True, help="folder for server0.key ... owner.key (mode 0600)")
    keys_cmd.set_defaults(func=_party_keys)

    public = command(sub, "public", help="write the public part of an mpc checkpoint (config, tokenizer; no weights)")
    public.add_argument("folder", help="the folder written by `hf-secure convert approximate`")
    public.add_argument("--out", required=True, help="where the public part goes (for servers, dealer, clients, Hub)")
    public.set_defaults(func=_public)

    keys = command(sub, "keys", help="the local key store")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    imp = command(keys_sub, "import", help="verify a key file and add it to the store")
    imp.add_argument("file")
    command(keys_sub, "list", help="list stored keys")
    rem = command(keys_sub, "remove", help="delete a stored key")
    rem.add_argument("fingerprint")
    keys.set_defaults(func=_keys)

    gen = command(sub, "generate", help="generate text privately")
    gen.add_argument("model", help="converted folder or Hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--key", default=None, help="key file (default: look it up in the key store)")
    gen.add_argument("--server-url", default=None, help="default: run the server part in this process; "
                     "its token is read from HF_SECURE_TOKEN")
    gen.add_argument("--ca-bundle", default=None, help="PEM file of the CAs to trust for an https server")
    gen.add_argument("--max-new-tokens", type=_positive, default=32)
    gen.set_defaults(func=_generate)

    push = command(sub, "push", help="upload a converted checkpoint (never its key) to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.set_defaults(func=_push)

    aud = command(sub, "audit", help="attack what the parties see on sample text and print what leaks")
    aud.add_argument("model", help="converted folder or Hub id")
    aud.add_argument("--protocol", default=None, help="the protocol to audit (default: the checkpoint's)")
    aud.add_argument("--original", default=None,
                     help="the open checkpoint the attacker knows (permute: required; mpc: default the checkpoint)")
    aud.add_argument("--key", default=None, help="permute: the client key file (default: the key store)")
    aud.add_argument("--text", default=None, metavar="FILE", help="sample text, one per line (default: built-in)")
    aud.add_argument("--layers", default="0,1,mid,last", help="residual-stream layers: numbers, mid, last")
    aud.add_argument("--views", default=None,
                     help="permute: the kinds of activation to attack, from residual,attention_input,q,k,v,ffn "
                          "(default: all)")
    aud.add_argument("--embedding-noise", type=float, default=None,
                     help="permute, client embeddings: std of the noise defence to measure")
    aud.add_argument("--shortlist", type=_positive, default=64,
                     help="candidates per position in the joint search (bidirectional models)")
    aud.add_argument("--sweeps", type=_positive, default=2, help="sweeps of the joint search")
    aud.add_argument("--max-length", type=_positive, default=32, help="tokens per sample")
    aud.add_argument("--json", default=None, metavar="OUT", help="write the table as JSON")
    aud.add_argument("--chart", default=None, metavar="OUT.png", help="draw recovery by layer")
    aud.set_defaults(func=_audit)

    demo = command(sub, "demo", help="convert, serve and generate privately, end to end")
    demo.add_argument("--model", default=None, help="source model (default: the embedded demo GPT-2)")
    demo.add_argument("--prompt", default=None)
    demo.add_argument("--max-new-tokens", type=_positive, default=32)
    demo.add_argument("--embeddings", choices=("client", "server"), default="client")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001  every failure ends in one line; the traceback only under -v
        if args.verbose:
            traceback.print_exc()
        print(f"hf-secure: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: Exception) -> str:
    """``Type: message`` on one line; an error hf_secure did not raise on purpose says how to see more."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if isinstance(exc, HfSecureError) else f"{line} (unexpected: rerun with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
