"""A local S3-compatible server for tests: moto's server mode on the loopback address, with IAM checks on, and a
user whose keys the tests put in the environment (as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, as users do)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """Start the server, make a user allowed everything and `bucket`; yield the environment that reaches them."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The first 3 requests (making the user, its keys and its policy) go unchecked; every later one needs the keys.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                               aws_secret_access_key="setup")
            iam.create_user(UserName="ddl")
            key = iam.create_access_key(UserName="ddl")["AccessKey"]
            iam.put_user_policy(UserName="ddl", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
            aws = {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
            boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
            yield aws
        finally:
            server.terminate()
