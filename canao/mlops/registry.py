"""The model registry on S3: `s3://<bucket>/models/<name>/<version>/`. The only module using boto3.

A version holds the files of a deployment (student model, compiled artifact per device) and
`manifest.json` (sha256 and size of every file, metrics, lineage). Versions are immutable
and appear whole: the files go up first, each is checked against the server's ETag (the MD5
of what it stored), and the manifest is written last with a conditional put (`If-None-Match:
*`), so a version is visible exactly when its manifest exists, and two pushes of one version
cannot both win. A push cut short (the store dies, the process is killed) leaves files
without a manifest: invisible, and overwritten by the retry. Downloads verify every sha256.

The endpoint comes from env CANAO_S3_ENDPOINT (unset: AWS), the credentials from boto3's
usual chain (env AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ...), never from code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

from canao.manifest import MANIFEST, check_file_name, sha256_file, staged_dir

PREFIX = "models"
MODEL_DIR, COMPILED_DIR = "model", "compiled"  # in a version: the model, and compiled/<device key>/ per device
URI_PATTERN = re.compile(rf"s3://([^/]+)/{PREFIX}/([^/]+)/([^/]+)/")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # names and versions: one S3 path segment each
CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken"}


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message names the bucket, version or file."""


class VersionExistsError(RegistryError, FileExistsError):
    """A push of a version that is already in the registry."""


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_name(rel: object, where: str) -> None:
    """A file name inside a version: relative, plain parts, not the manifest's own name."""
    try:
        check_file_name(rel, where)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    if rel == MANIFEST:
        raise RegistryError(f"{where}: {rel!r} is the version's own manifest")


def _check_segment(value: str, what: str) -> None:
    if not NAME_PATTERN.fullmatch(value):
        raise RegistryError(f"{what}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 128)")


class Registry:
    def __init__(self, bucket: str, endpoint_url: str | None = None):
        _check_segment(bucket, "bucket")
        self.bucket = bucket
        self.endpoint_url = endpoint_url if endpoint_url is not None else os.environ.get("CANAO_S3_ENDPOINT")
        # A session of its own: boto3's default session keeps the credentials it first resolved.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url or None,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint_url or 'AWS'}"

    def uri(self, name: str, version: str) -> str:
        return f"s3://{self.bucket}/{self._prefix(name, version)}"

    @staticmethod
    def _prefix(name: str, version: str) -> str:
        _check_segment(name, "name")
        _check_segment(version, "version")
        return f"{PREFIX}/{name}/{version}/"

    def _call(self, what: str, method: str, **kwargs):
        """One S3 call; a refused credential or an unreachable store becomes a RegistryError."""
        try:
            return getattr(self.client, method)(**kwargs)
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "AccessDenied":
                raise RegistryError(f"{self.where()}: access denied while {what}: these credentials may not do "
                                    "that (serving's read-only keys can pull, not push)") from None
            if code in CREDENTIAL_ERRORS:
                raise RegistryError(f"{self.where()}: the credentials were rejected ({code}) while {what}; "
                                    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise
        except botocore.exceptions.NoCredentialsError:
            raise RegistryError(f"{self.where()}: no credentials; set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as e:
            raise RegistryError(f"{self.where()}: the store does not answer while {what}: {e}") from None

    def ensure_bucket(self) -> None:
        """Check the credentials and the bucket before anything is written; create a missing bucket."""
        try:
            self._call("checking the bucket", "head_bucket", Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            self._call("creating the bucket", "create_bucket", Bucket=self.bucket)

    def _exists(self, key: str) -> bool:
        try:
            self._call(f"reading {key}", "head_object", Bucket=self.bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def manifest(self, name: str, version: str) -> dict:
        key = self._prefix(name, version) + MANIFEST
        try:
            body = self._call(f"reading {key}", "get_object", Bucket=self.bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
                raise RegistryError(f"{self.uri(name, version)}: no such version") from None
            raise
        return json.loads(body)

    def has_version(self, name: str, version: str) -> bool:
        return self._exists(self._prefix(name, version) + MANIFEST)

    def _children(self, prefix: str) -> list[str]:
        names, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self._call(f"listing {prefix}", "list_objects_v2", **kwargs)
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    return []
                raise
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(names)

    def names(self) -> list[str]:
        return self._children(f"{PREFIX}/")

    def versions(self, name: str) -> list[str]:
        """The visible (complete) versions of `name`, oldest first."""
        _check_segment(name, "name")
        complete = [v for v in self._children(f"{PREFIX}/{name}/") if self.has_version(name, v)]
        return sorted(complete, key=lambda v: self.manifest(name, v)["created"])

    def push(self, name: str, version: str, files: dict[str, Path], metadata: dict) -> dict:
        """Upload `files` (registry path -> local file) as `name`/`version` with `metadata`
        (metrics, lineage, ...) in its manifest; refuses a version that exists."""
        prefix = self._prefix(name, version)
        for rel in files:
            _file_name(rel, "a pushed file")
        self.ensure_bucket()
        if self.has_version(name, version):
            raise VersionExistsError(f"{self.uri(name, version)}: version exists; versions are immutable")
        entries = {}
        for rel, path in sorted(files.items()):
            path = Path(path)
            sha256 = sha256_file(path)
            key = prefix + rel
            with open(path, "rb") as body:
                response = self._call(f"uploading {key}", "put_object", Bucket=self.bucket, Key=key, Body=body,
                                      Metadata={"sha256": sha256})
            if response["ETag"].strip('"') != _md5(path):
                raise RegistryError(f"{self.uri(name, version)}{rel}: the store holds other bytes than {path}")
            entries[rel] = {"sha256": sha256, "size": path.stat().st_size}
        manifest = {
            "name": name, "version": version, "uri": self.uri(name, version),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": entries, **metadata,
        }
        try:
            self._call(f"writing {prefix}{MANIFEST}", "put_object", Bucket=self.bucket, Key=prefix + MANIFEST,
                       Body=json.dumps(manifest, indent=1, sort_keys=True).encode(), IfNoneMatch="*",
                       ContentType="application/json")
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise VersionExistsError(f"{self.uri(name, version)}: pushed by someone else meanwhile") from None
            raise
        return manifest

    def pull(self, name: str, version: str, out_dir: str | Path) -> dict:
        """Download `name`/`version` into `out_dir` (which must not exist), verifying every sha256;
        `out_dir` appears only when all files are there and verified."""
        out_dir = Path(out_dir)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir}: already exists; choose another --out")
        manifest = self.manifest(name, version)
        prefix = self._prefix(name, version)
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                                  for e in files.values()):
            raise RegistryError(f"{self.uri(name, version)}{MANIFEST}: field 'files' must map file names to "
                                "{\"sha256\": ...}")
        for rel in files:  # every name checked before anything is written
            _file_name(rel, f"{self.uri(name, version)}{MANIFEST}: field 'files'")
        with staged_dir(out_dir) as staging:
            for rel, entry in manifest["files"].items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self._call(f"downloading {prefix}{rel}", "download_file", Bucket=self.bucket, Key=prefix + rel,
                           Filename=str(target))
                if sha256_file(target) != entry["sha256"]:
                    raise RegistryError(f"{self.uri(name, version)}{rel}: sha256 differs from its manifest")
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return manifest


def parse_uri(uri: str) -> tuple[str, str, str]:
    """(bucket, name, version) of a version's URI, as `Registry.uri` writes it."""
    match = URI_PATTERN.fullmatch(uri)
    if match is None:
        raise RegistryError(f"{uri}: not a registry version URI (s3://<bucket>/{PREFIX}/<name>/<version>/)")
    return match.group(1), match.group(2), match.group(3)


def _intact(local: Path) -> bool:
    """Whether a pulled version still holds every file of its manifest, unchanged."""
    manifest = json.loads((local / MANIFEST).read_text())
    return all((local / rel).is_file() and sha256_file(local / rel) == entry["sha256"]
               for rel, entry in manifest["files"].items())


def pull_cached(uri: str, cache_dir: str | Path) -> Path:
    """The version at `uri` as the local directory `<cache_dir>/<bucket>/<name>/<version>/`:
    pulled (verified) the first time; its files are checked again on every later use, and a
    copy that changed is pulled again. Versions are immutable, so a good copy never goes stale."""
    bucket, name, version = parse_uri(uri)
    local = Path(cache_dir) / bucket / name / version
    if local.is_dir():
        if _intact(local):
            return local
        print(f"{local}: differs from its manifest; pulling {uri} again", flush=True)
        shutil.rmtree(local)
    Registry(bucket).pull(name, version, local)
    return local


def directory_files(directory: Path, under: str) -> dict[str, Path]:
    """Every file below `directory` as registry path `under/<relative path>` -> file."""
    return {f"{under}/{p.relative_to(directory).as_posix()}": p for p in sorted(directory.rglob("*")) if p.is_file()}


def content_version(files: dict[str, Path]) -> str:
    """A version named by its content: the same files always give the same version."""
    digest = hashlib.sha256()
    for rel, path in sorted(files.items()):
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return "sha-" + digest.hexdigest()[:16]


def add_cli(subparsers) -> None:
    """`canao registry list|show|pull`."""
    p = subparsers.add_parser("registry", help="list, inspect or download model versions in the S3 registry")
    p.add_argument("action", choices=("list", "show", "pull"))
    p.add_argument("name", nargs="?", help="model name (list: all names when left out)")
    p.add_argument("version", nargs="?", help="version (show, pull)")
    p.add_argument("--bucket", default=os.environ.get("CANAO_BUCKET", "canao"), help="S3 bucket (env CANAO_BUCKET)")
    p.add_argument("--out", help="pull: directory to create")
    p.set_defaults(func=_cmd_registry)


def _cmd_registry(args) -> None:
    registry = Registry(args.bucket)
    if args.action == "list":
        names = [args.name] if args.name else registry.names()
        print(json.dumps({n: registry.versions(n) for n in names}, indent=1))
        return
    if not (args.name and args.version):
        raise ValueError(f"registry {args.action}: needs NAME and VERSION")
    if args.action == "show":
        print(json.dumps(registry.manifest(args.name, args.version), indent=1, sort_keys=True))
    else:
        if not args.out:
            raise ValueError("registry pull: --out is required")
        manifest = registry.pull(args.name, args.version, args.out)
        print(json.dumps({"out": str(Path(args.out).resolve()), "files": len(manifest["files"])}))
