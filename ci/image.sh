#!/usr/bin/env bash
# The container image for remote execution, built from scratch with umoci
# (no Docker daemon, nothing downloaded): the static worker, /tmp, and a
# non-root user to run as. No shell, no libc, no package manager.
# Usage: ci/image.sh     (runs ci/release.sh first if the binary is missing)
# Output: target/image/oci (OCI layout, tagged with the crate version) and
#         target/image/persistent-worker.tar (docker-archive, for `docker load`)
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
# PERSISTENT_WORKER_BINARY overrides which binary goes in (it must be static).
binary=${PERSISTENT_WORKER_BINARY:-target/$triple/release/persistent-worker}
# The image's user: the conventional "nonroot" id of distroless images.
user=worker
uid=65532
[ -x "$binary" ] || ci/release.sh
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
out=target/image
layout="$out/oci"
rm -rf "$out"
mkdir -p "$out"
umoci init --layout "$layout"
umoci new --image "$layout:$version"

bundle="$out/bundle"
umoci unpack --image "$layout:$version" "$bundle" >/dev/null
root="$bundle/rootfs"
install -d -m 0755 "$root/usr/local/bin" "$root/etc"
install -m 0755 "$binary" "$root/usr/local/bin/persistent-worker"
install -d -m 1777 "$root/tmp"
printf '%s:x:%s:%s:%s:/tmp:/sbin/nologin\n' "$user" "$uid" "$uid" "$user" >"$root/etc/passwd"
printf '%s:x:%s:\n' "$user" "$uid" >"$root/etc/group"
chmod 0644 "$root/etc/passwd" "$root/etc/group"
umoci repack --image "$layout:$version" \
  --history.created_by "ci/image.sh" "$bundle"
rm -rf "$bundle"
umoci config --image "$layout:$version" \
  --clear config.env --clear config.cmd --clear config.entrypoint \
  --config.env PATH=/usr/local/bin \
  --config.user "$uid:$uid" \
  --config.workingdir /tmp \
  --os linux --architecture amd64
umoci gc --layout "$layout"

skopeo copy --quiet "oci:$layout:$version" \
  "docker-archive:$out/persistent-worker.tar:persistent-worker:$version"

bytes() { du -sb "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
blobs=$(bytes "$layout/blobs")
tar_bytes=$(bytes "$out/persistent-worker.tar")
echo "image: $layout:$version"
echo "compressed (OCI layout blobs): $blobs bytes ($(mib "$blobs"))"
echo "archive: $out/persistent-worker.tar $tar_bytes bytes ($(mib "$tar_bytes"))"
echo "contents:"
for layer in $(jq -r '.layers[].digest' "$layout/blobs/sha256/$(jq -r '.manifests[0].digest' "$layout/index.json" | cut -d: -f2)"); do
  tar -tvzf "$layout/blobs/sha256/${layer#sha256:}"
done
echo "config:"
skopeo inspect --config "oci:$layout:$version" | jq -c '.config'
digest=$(jq -r '.manifests[0].digest' "$layout/index.json")
echo "push (the manifest is kept as is, so the digest stays valid):"
echo "  skopeo copy --preserve-digests oci:$layout:$version docker://ghcr.io/<user>/persistent-worker:$version"
echo "pin in .buckconfig ([persistent_worker] container_image):"
echo "  docker://ghcr.io/<user>/persistent-worker@$digest"
