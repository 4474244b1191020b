#!/bin/busybox sh
# /init of a Tresor guest image (docs/images.md). The kernel runs it as PID 1 from the initramfs
# that `tresor image build` writes; it is part of the measured initrd. It brings up only what the
# agent needs — /proc, /sys, /dev, the virtio modules, loopback, a step's network, the job's
# shares — finds the control channel by its name, and hands over to tresor-agent. Whatever happens, it ends by
# powering the VM off: the domain is configured to be destroyed then (one job, one boot).
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0700 tmpfs /tmp

say() { echo "tresor-init: $*" > /dev/console; }

# Modules, dependencies first (the order file was computed from modules.dep at build time).
# sev-guest loads only in an SEV-SNP guest; elsewhere its failure is expected.
while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null || case "$m" in *sev-guest*) ;; *) say "module $m did not load" ;; esac
done < /etc/tresor/modules

ip link set lo up

# A step's rank (TRESOR_STEP_ROSTER=1) meets the step's other tasks on the node's step network:
# the runner gave its VM one virtio-net NIC on the step bridge (docs/scale.md §2.2), and the
# step network's DHCP server gives the address. Whatever the host does with it, the ranks' links
# over it are TLS pinned to attested keys: the host carries ciphertext only. Without a NIC (every
# other job) the guest has no network at all.
if [ -e /sys/class/net/eth0 ]; then
  cat > /etc/tresor/dhcp-event <<'END'
#!/bin/busybox sh
# udhcpc's event script: $1 the event; $interface, $ip, $mask from the lease.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew) ip -4 addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
exit 0
END
  chmod 0755 /etc/tresor/dhcp-event
  ip link set eth0 up
  # -n: give up after the tries (no lease: rank 0 then has no address and says so); once it has
  # one, udhcpc stays in the background to renew it.
  udhcpc -i eth0 -n -t 20 -T 1 -s /etc/tresor/dhcp-event -p /run/udhcpc.pid > /dev/null 2>&1 || say "eth0: no lease from the step network's DHCP"
  say "eth0: $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
fi

# The job's datasets, read-only 9p shares found by their tags in sysfs. They belong to the host:
# nothing on them is ever executed (noexec, nosuid, nodev). Nothing is shared writable: the sealed
# outputs go back over the control channel.
for tagfile in /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag; do
  [ -e "$tagfile" ] || continue
  tag=$(cat "$tagfile" | tr -d '\0')
  mkdir -p "/mnt/$tag"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,nosuid,nodev,noexec "$tag" "/mnt/$tag" || say "share $tag did not mount"
done
# The control channel: a virtio-serial port named org.tresor.control (no udev here, so the name
# is read from sysfs rather than from /dev/virtio-ports).
control=
for port in /sys/class/virtio-ports/*; do
  [ -e "$port/name" ] || continue
  if [ "$(cat "$port/name")" = org.tresor.control ]; then control=/dev/${port##*/}; fi
done

say "ready (kernel $(uname -r))"
if [ -n "$control" ]; then
  /usr/libexec/tresor/tresor-agent --guest "$control"
  say "agent exited with status $?"
else
  say "no control channel (org.tresor.control): nothing to run"
fi
sync
poweroff -f
