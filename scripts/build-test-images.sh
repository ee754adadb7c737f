#!/usr/bin/env bash
# Builds the images the Docker runtime tests use, from nothing but Debian's static busybox
# (the machine has a Docker engine but no registry, so nothing can be pulled):
#
#   mesh-test/busybox:latest   FROM scratch; /bin/busybox with its applets installed as
#                              symlinks in /bin (sh, httpd, sleep, cat, echo, ...), and
#                              /www/index.html so `httpd -f -p 8080 -h /www` answers 200.
#
# Idempotent: the image carries the label mesh.test-image.hash (a hash of this script and of
# the busybox binary); when an image with the same hash exists the build is skipped. Safe to run
# concurrently (flock on /tmp/mesh-build-test-images.lock). Exits non-zero with a clear message
# when no Docker engine answers.
set -euo pipefail

IMAGE="mesh-test/busybox:latest"
LABEL="mesh.test-image.hash"
LOCK="/tmp/mesh-build-test-images.lock"

say() { echo "build-test-images: $*"; }
die() { echo "build-test-images: error: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed (apt-get install docker.io)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "no Docker engine answers (is dockerd running? DOCKER_HOST=${DOCKER_HOST:-unset})"

exec 9>"$LOCK"
flock 9

if [ ! -x /bin/busybox ]; then
  say "installing busybox-static (no /bin/busybox)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq busybox-static >/dev/null
fi
[ -x /bin/busybox ] || die "/bin/busybox is still missing after installing busybox-static"
# A dynamically linked busybox would not run in a FROM-scratch image.
if command -v file >/dev/null 2>&1 && ! file -L /bin/busybox | grep -q 'statically linked'; then
  die "/bin/busybox is not statically linked (install busybox-static, not busybox)"
fi

HASH=$(cat "${BASH_SOURCE[0]}" /bin/busybox | sha256sum | cut -c1-16)
HAVE=$(docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null || true)
if [ "$HAVE" = "$HASH" ]; then
  say "$IMAGE is up to date (hash $HASH); nothing to do"
  exit 0
fi

CTX=$(mktemp -d /tmp/mesh-test-image.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
cp /bin/busybox "$CTX/busybox"
mkdir -p "$CTX/www"
printf '<html><body>mesh test image</body></html>\n' >"$CTX/www/index.html"
cat >"$CTX/Dockerfile" <<DOCKERFILE
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/busybox", "mkdir", "-p", "/tmp", "/usr/bin", "/usr/sbin", "/sbin"]
COPY www /www
ENV PATH=/bin:/sbin:/usr/bin:/usr/sbin
LABEL $LABEL=$HASH
CMD ["/bin/sh"]
DOCKERFILE

if [ -n "$HAVE" ]; then
  say "rebuilding $IMAGE (hash $HAVE -> $HASH)"
else
  say "building $IMAGE (hash $HASH)"
fi
# The legacy builder: it needs no buildx plugin and no base image.
if ! DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" "$CTX" >"$CTX/build.log" 2>&1; then
  cat "$CTX/build.log" >&2
  die "docker build of $IMAGE failed"
fi
docker run --rm --network none "$IMAGE" sh -c 'test -x /bin/httpd && test -x /bin/sleep && test -f /www/index.html' \
  || die "the built $IMAGE lacks its applets or /www/index.html"
say "built $IMAGE ($(docker image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-19))"
