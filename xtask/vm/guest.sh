#!/usr/bin/env bash
# Runs inside the VM `cargo xtask vmtest` boots. virtme-ng gives it the host's / read-only over
# 9p with RAM overlays on /etc, /tmp, /var..., a tmpfs /run, a pure cgroup2 at /sys/fs/cgroup,
# no bpffs and no NIC. $1 is the --rwdir, the only way out: the host wrote env.sh there (PATH,
# the nextest reuse-build files, the test arguments) and reads back what this leaves in it.
# vng's own exit status does not carry the command's, hence the status files.
set -uo pipefail
out=$1
# shellcheck source=/dev/null
. "$out/env.sh"

read -r booted _ </proc/uptime
echo "$booted" >"$out/boot-seconds"
uname -r >"$out/kernel"
echo "vmtest: kernel $(uname -r) booted in ${booted}s"

# The agent mounts bpffs itself, but the tests pin under /sys/fs/bpf before any agent runs.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# Modules the host's kernel lacks and this one has (SCTP Services, IPIP and WireGuard devices),
# and TUN, which a freshly booted guest has not loaded yet.
for module in sctp ipip wireguard tun; do
    modprobe "$module" || echo "vmtest: module $module did not load"
done

demo_status=0
"$BKP_SANDBOX_BIN" demo --ready-timeout "$((30 * BKP_TEST_TIMEOUT_SCALE))s" 2>&1 | tee "$out/demo.log" || demo_status=$?
echo "$demo_status" >"$out/demo.status"

# Reusing the host's build: nextest runs the listed binaries without cargo, writing nothing
# under the read-only target/.
tests_status=0
cargo-nextest nextest run --binaries-metadata "$out/binaries.json" \
    --cargo-metadata "$out/cargo-metadata.json" --profile vm --no-fail-fast "$@" 2>&1 \
    | tee "$out/tests.log" || tests_status=$?
echo "$tests_status" >"$out/tests.status"

read -r finished _ </proc/uptime
echo "$finished" >"$out/done-seconds"
