"""What can be checked before a run starts: the input exists and is a file, the output folder
is not a file, and remote storage answers with the credentials at hand. Each problem is named
with its fix in seconds, before a Prefect server starts or a model loads; storage errors met
later, during the run, are retried as the passing failures they may be."""

from __future__ import annotations

import os

from reflectune import intake, io
from reflectune.config import RecycleParams
from reflectune.errors import InputFileError


def check(params: RecycleParams) -> None:
    """Raise InputFileError naming every problem found."""
    found = [_input(params.dataset, "dataset"), _output(params.output)]
    if params.evaluation.enabled and params.evaluation.test_sets:
        found += [_input(uri, "evaluation.test_sets") for uri in params.evaluation.test_set_uris]
    problems = [p for p in found if p]
    if problems:
        raise InputFileError(problems[0] if len(problems) == 1 else
                             "the run cannot start:\n" + "\n".join(f"  {p}" for p in problems))
    if _local(params.dataset):  # read it through once: a bad file is named in a second, not after a retry
        intake.load(params.dataset, intake.parse_column_map(params.column_map), params.limit)
    test_sets(params)


def test_sets(params: RecycleParams) -> None:
    """Read the evaluation's test sets through once, when the run will evaluate: a bad or empty
    one is named before anything trains, not after."""
    if params.evaluation.enabled:
        from reflectune.evaluation import load_test_set

        for uri in params.evaluation.test_set_uris:
            load_test_set(uri)


def _local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _input(uri: str, what: str) -> str | None:
    if _local(uri):
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            return f"{what} {uri}: no such file: check the path"
        if os.path.isdir(path):
            return f"{what} {uri}: is a folder, not a file: give the data file inside it"
        if not os.access(path, os.R_OK):
            return f"{what} {uri}: cannot be read (permissions): make it readable"
        return None
    try:
        fs, path = io.filesystem(uri, quick=True)
        if not fs.exists(path):
            return f"{what} {uri}: no such object: check the bucket and key"
        if fs.isdir(path):
            return f"{what} {uri}: is a prefix (a folder), not a file: give the data file inside it"
    except Exception as exc:  # noqa: BLE001 - botocore and fsspec raise many kinds
        return storage_problem(uri, exc, what)
    return None


def _output(uri: str) -> str | None:
    if _local(uri):
        path = uri.removeprefix("file://")
        if os.path.isfile(path):
            return f"output {uri}: is a file: the output is a folder; name a folder (new or from an earlier run)"
        return None
    try:
        fs, path = io.filesystem(uri, quick=True)
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            return f"output {uri}: the bucket {bucket} does not exist or is not yours: create it or fix the name"
        if fs.isfile(path):
            return f"output {uri}: is an object (a file): the output is a folder; name a prefix"
    except Exception as exc:  # noqa: BLE001
        return storage_problem(uri, exc, "output")
    return None


def storage_problem(uri: str, exc: BaseException, what: str) -> str:
    """What a storage error means for the user, and the fix."""
    name = type(exc).__name__
    endpoint = os.environ.get("REFLECTUNE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in str(exc).lower():
        return (f"{what} {uri}: no S3 credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the environment")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError") \
            or "connect" in str(exc).lower():
        where = endpoint or "the AWS default endpoint"
        return (f"{what} {uri}: cannot reach the S3 endpoint {where}: check REFLECTUNE_S3_ENDPOINT_URL (or "
                "AWS_ENDPOINT_URL) and the network")
    if isinstance(exc, PermissionError) or name in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"{what} {uri}: access denied ({exc}): check the S3 credentials and the bucket's permissions"
    return f"{what} {uri}: the storage failed: {name}: {exc}"
