"""Data versioning helpers around DVC.

``hescape data s3-remote`` points the ``s3`` DVC remote at the bucket and endpoint named in the
environment (``HESCAPE_S3_BUCKET``, ``HESCAPE_S3_PREFIX``, ``HESCAPE_S3_ENDPOINT`` or
``AWS_ENDPOINT_URL``, ``HESCAPE_S3_REGION``) by writing the git-ignored ``.dvc/config.local``;
credentials stay in the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or
``AWS_PROFILE``). ``hescape data version PATH`` prints the DVC hash of a tracked output and the git
commit, the pair every run records.
"""

from __future__ import annotations

import json

NAME = "data"
HELP = "DVC helpers: configure the S3 remote from the environment, print a data version"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s3 = sub.add_parser("s3-remote", help="write the s3 remote's bucket/endpoint from the environment into "
                                          ".dvc/config.local (never credentials)")
    s3.add_argument("--repo", default=".", help="repository root (default: .)")
    s3.add_argument("--bucket", help="bucket (default: $HESCAPE_S3_BUCKET)")
    s3.add_argument("--prefix", help="key prefix in the bucket (default: $HESCAPE_S3_PREFIX or 'dvc')")
    s3.add_argument("--endpoint", help="S3 API endpoint URL (default: $HESCAPE_S3_ENDPOINT, "
                                       "$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL; unset = AWS)")
    s3.add_argument("--region", help="region (default: $HESCAPE_S3_REGION; else botocore's own lookup)")
    s3.add_argument("--default", action="store_true", help="also make s3 this checkout's default remote")
    ver = sub.add_parser("version", help="DVC hash of a tracked output and the git commit")
    ver.add_argument("path", help="a DVC-tracked output, e.g. data/panels/simulated")
    ver.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from hescape import versioning

    if args.data_command == "s3-remote":
        written = versioning.configure_s3_remote(args.repo, bucket=args.bucket, prefix=args.prefix,
                                                 endpoint=args.endpoint, region=args.region, default=args.default)
        if not written:
            print("nothing to write: set HESCAPE_S3_BUCKET and/or HESCAPE_S3_ENDPOINT (or pass --bucket/--endpoint);"
                  " the s3 remote keeps the URL in .dvc/config")
        for key, value in written.items():
            print(f"  .dvc/config.local: {key if '.' in key else 'remote.s3.' + key} = {value}")
        if not versioning.has_s3_credentials():
            print("note: no AWS credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                  "AWS_PROFILE); dvc push/pull will need them")
        return 0
    if args.data_command == "version":
        info = versioning.data_version(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                print(f"{key}: {value}")
        return 0 if info["dvc_hash"] is not None else 1
    raise AssertionError(args.data_command)
