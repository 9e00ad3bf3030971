"""`make image`: build the components' image (Dockerfile) with the Docker engine's SDK.

Tags it env CANAO_IMAGE (components/tasks.py's base_image) and records the git commit in
it. Where no Docker engine answers it says so and exits non-zero.
"""

from __future__ import annotations

import sys

import docker
from docker.errors import BuildError, DockerException

from canao.config import PROJECT_ROOT
from canao.mlops.tracking import git_commit
from components.tasks import IMAGE


def build(tag: str = IMAGE) -> str:
    client = docker.from_env()
    client.ping()
    image, _ = client.images.build(path=str(PROJECT_ROOT), tag=tag, buildargs={"GIT_COMMIT": git_commit()},
                                   rm=True)
    return image.id


def main() -> int:
    try:
        image_id = build()
    except BuildError as e:
        print(f"make image: the build of {IMAGE} failed: {e}", file=sys.stderr)
        return 1
    except DockerException as e:
        print(f"make image: no Docker engine answers (DOCKER_HOST or /var/run/docker.sock): {e}; "
              f"the image {IMAGE} was not built", file=sys.stderr)
        return 1
    print(f"{IMAGE} {image_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
