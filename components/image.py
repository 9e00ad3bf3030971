"""`make image`: build the Dockerfile's two images with the Docker engine's SDK.

Its `pipeline` stage is tagged env CANAO_IMAGE (components/tasks.py's base_image), its
`serving` stage SERVING_IMAGE (k8s/serving); both record the git commit. Where no Docker
engine answers it says so and exits non-zero.
"""

from __future__ import annotations

import sys

import docker
from docker.errors import BuildError, DockerException

from canao.config import PROJECT_ROOT
from canao.mlops.tracking import git_commit
from components.tasks import IMAGE

SERVING_IMAGE = "canao-serving:0.1.0"  # k8s/serving/kustomization.yaml names it
TARGETS = {"serving": SERVING_IMAGE, "pipeline": IMAGE}  # Dockerfile stage -> tag


def build(target: str, tag: str) -> str:
    client = docker.from_env()
    client.ping()
    image, _ = client.images.build(path=str(PROJECT_ROOT), tag=tag, target=target,
                                   buildargs={"GIT_COMMIT": git_commit()}, rm=True)
    return image.id


def main() -> int:
    for target, tag in TARGETS.items():
        try:
            image_id = build(target, tag)
        except BuildError as e:
            print(f"make image: the build of {tag} (stage {target}) failed: {e}", file=sys.stderr)
            return 1
        except DockerException as e:
            print(f"make image: no Docker engine answers (DOCKER_HOST or /var/run/docker.sock): {e}; "
                  f"the image {tag} was not built", file=sys.stderr)
            return 1
        print(f"{tag} {image_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
