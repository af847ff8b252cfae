#!/bin/bash
# setup.sh : real Nix clients of three generations on this Debian 12 machine (idempotent, as root).
#   host                Nix 2.8  (Debian bookworm's nix-bin), plus OpenSSH and a static busybox
#   $CHROOTS/trixie     Nix 2.26 (Debian trixie in a chroot)
#   $CHROOTS/sid        Nix 2.34 (Debian sid in a chroot)
# Each client store gets the same busybox directory as a store path; the last line printed is
# "BB=<that store path>". Run a command with a client:  chroot $CHROOTS/sid nix-build ...
# The chroots share /dev, /dev/pts and /proc with the host; mount anything else you need into
# them (e.g. your build's binaries at the same absolute path) with mount --bind. Each chroot has
# a nixbld group with four build users; a sandboxed build there needs pivot_root in a private
# mount namespace, not chroot (Nix silently builds unsandboxed in a chroot).
# Debian's package mirror is taken from this machine's own apt sources.
# It also writes the busybox store path to $CHROOTS/busybox-path, where the tests read it
# (tests/harness/clients.rs). scripts/test runs this script when the chroots are missing.
set -eu
CHROOTS=${CHROOTS:-/tmp/chroots}
export DEBIAN_FRONTEND=noninteractive
if ! command -v nix-store >/dev/null || ! command -v sshd >/dev/null || ! [ -x /bin/busybox ] || ! command -v debootstrap >/dev/null; then
  apt-get update -q >/dev/null 2>&1 || true
  apt-get install -y -q nix-bin openssh-server openssh-client busybox-static debootstrap >/dev/null
fi
mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb +[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n 1)
[ -n "$mirror" ] || { echo "setup.sh: no Debian mirror found in this machine's apt sources" >&2; exit 1; }
mkdir -p /etc/nix
[ -f /etc/nix/nix.conf ] || printf 'sandbox = false\nsubstituters =\nbuild-users-group =\nexperimental-features = nix-command\n' > /etc/nix/nix.conf
d=/tmp/bbdir; rm -rf $d; mkdir -p $d/bin; cp /bin/busybox $d/bin/busybox
for a in sh mkdir ls cat echo cp sleep head env sort id hostname sed touch chmod ln rm dd wc true false tr grep ip mv printf test sha256sum ps kill nc wget awk find xargs stat readlink; do ln -s busybox $d/bin/$a; done
BB=$(nix-store --add $d)
for rel in trixie sid; do
  r=$CHROOTS/$rel
  if ! [ -x $r/usr/bin/nix-store ]; then
    mkdir -p $CHROOTS
    debootstrap --variant=minbase --include=nix-bin,openssh-client,busybox-static $rel $r "$mirror" >$CHROOTS/$rel.log 2>&1 || true
    echo "deb $mirror $rel main" > $r/etc/apt/sources.list
    mountpoint -q $r/proc || mount -t proc proc $r/proc
    # sid's release file may be older than apt accepts; perl's DBI is a missing dependency of nix-bin there
    chroot $r sh -c 'apt-get -o Acquire::Check-Valid-Until=false update -q && apt-get -y -q -f install && apt-get install -y -q libdbi-perl nix-bin openssh-client busybox-static' >>$CHROOTS/$rel.log 2>&1
  fi
  mountpoint -q $r/proc || mount -t proc proc $r/proc
  mountpoint -q $r/dev || mount --rbind /dev $r/dev
  mountpoint -q $r/dev/pts || mount --bind /dev/pts $r/dev/pts
  mkdir -p $r/etc/nix $r/root/.ssh
  [ -f $r/etc/nix/nix.conf.set ] || { cp /etc/nix/nix.conf $r/etc/nix/nix.conf; touch $r/etc/nix/nix.conf.set; }
  # build users, for sandboxed reference builds (--option build-users-group nixbld)
  chroot $r sh -c 'getent group nixbld >/dev/null || { groupadd -r nixbld && for i in 1 2 3 4; do useradd -r -M -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin nixbld$i; done; }'
  rm -rf $r/tmp/bbdir; cp -a $d $r/tmp/bbdir
  b2=$(chroot $r nix-store --add /tmp/bbdir)
  [ "$b2" = "$BB" ] || { echo "setup.sh: the busybox store path differs in $rel: $b2" >&2; exit 1; }
  echo "$rel: $(chroot $r nix --version)"
done
echo "host: $(nix --version)"
echo "$BB" > $CHROOTS/busybox-path
echo "BB=$BB"
