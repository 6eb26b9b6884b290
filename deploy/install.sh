#!/usr/bin/env bash
# Installs stackclone on this host (or into DESTDIR, for packagers):
#
#   PREFIX/bin/stackclone-{source,target,certs}        the binaries
#   UNITDIR/stackclone-*.service, *.timer               systemd units (ExecStart= set to PREFIX/bin)
#   /etc/stackclone/{source,target}.toml                from deploy/examples, ONLY if absent
#   /etc/stackclone/conf.d/                             empty: one file per stack goes here
#   /var/lib/stackclone/                                state dir (0700)
#   PREFIX/share/doc/stackclone/examples/               all example configs, incl. conf.d stacks
#   PREFIX/share/bash-completion/completions/, zsh/site-functions/, fish/vendor_completions.d/
#   PREFIX/share/man/man1/stackclone-*.1                man pages
#
# Completions and man pages come from the binaries themselves (`BIN completions SHELL`,
# `BIN man DIR`), so they always match the installed flags. Nothing under /etc/stackclone
# is ever overwritten, and no unit is enabled or started: see deploy/INSTALL.md for that.
#
# Usage: deploy/install.sh [OPTIONS]
#   --bin-dir DIR     take the binaries from DIR (e.g. ~/.cargo/bin after `cargo install`, or
#                     an unpacked release). Default: target/release of this tree, built with
#                     `cargo build --release --locked` first.
#   --prefix DIR      default /usr/local (or $PREFIX)
#   --role ROLE       which main config to seed: source, target or both (default both)
#   --no-docs         skip completions and man pages
#   --dry-run         print what would be done; change nothing
#   --uninstall       remove what an install put in place (binaries, units, completions, man
#                     pages, doc examples); keeps /etc/stackclone and /var/lib/stackclone
#   -h, --help
# Env:  DESTDIR (staging root for packages, default empty), PREFIX,
#       UNITDIR (/etc/systemd/system; packages use /usr/lib/systemd/system)
# /etc/stackclone and /var/lib/stackclone are fixed: the units name them (ConfigurationDirectory=,
# StateDirectory=).
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD

BINS=(stackclone-source stackclone-target stackclone-certs)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BIN_DIR=
ROLE=both
DOCS=1
DRY=0
UNINSTALL=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift ;;
    --bin-dir=*) BIN_DIR=${1#*=} ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --role) ROLE=${2:?--role needs source, target or both}; shift ;;
    --role=*) ROLE=${1#*=} ;;
    --no-docs) DOCS=0 ;;
    --dry-run) DRY=1 ;;
    --uninstall) UNINSTALL=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
# Paths given relative to where the script was called from, not to the tree it cds into.
case "$BIN_DIR" in "" | /*) ;; *) BIN_DIR=$CALLER_PWD/$BIN_DIR ;; esac
case "$DESTDIR" in "" | /*) ;; *) DESTDIR=$CALLER_PWD/$DESTDIR ;; esac
case "$ROLE" in source | target | both) ;; *) die "--role must be source, target or both, not $ROLE" ;; esac
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path (the units name it)" ;; esac

D_BIN=$DESTDIR$PREFIX/bin
D_UNIT=$DESTDIR$UNITDIR
D_ETC=$DESTDIR/etc/stackclone
D_STATE=$DESTDIR/var/lib/stackclone
D_DOC=$DESTDIR$PREFIX/share/doc/stackclone
D_MAN=$DESTDIR$PREFIX/share/man/man1
D_BASH=$DESTDIR$PREFIX/share/bash-completion/completions
D_ZSH=$DESTDIR$PREFIX/share/zsh/site-functions
D_FISH=$DESTDIR$PREFIX/share/fish/vendor_completions.d

# Every change goes through `run` (or `run_to` for a command whose stdout is the file), so
# --dry-run shows exactly what a real run does.
run() {
    printf '+ %s\n' "$*"
    [ "$DRY" = 1 ] || "$@"
}
run_to() { # FILE COMMAND...
    local file=$1
    shift
    printf '+ %s > %s\n' "$*" "$file"
    [ "$DRY" = 1 ] || "$@" >"$file"
}

if [ "$(id -u)" != 0 ] && [ -z "$DESTDIR" ] && [ "$DRY" = 0 ]; then
    echo "install.sh: warning: not root and no DESTDIR; writing to $PREFIX, /etc and" \
        "$UNITDIR will likely fail (use sudo, or DESTDIR=... for a staging root)" >&2
fi

units=(deploy/systemd/*.service deploy/systemd/*.timer)

if [ "$UNINSTALL" = 1 ]; then
    if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
        # Stop and disable every stackclone unit, template instances (push@STACK.timer) too.
        enabled=$(find /etc/systemd/system -path '*.wants/stackclone-*' -printf '%f\n' 2>/dev/null | sort -u)
        active=$(systemctl list-units --all --plain --no-legend 'stackclone-*' | awk '{ print $1 }')
        # shellcheck disable=SC2086
        [ -z "$enabled$active" ] || run systemctl disable --now $enabled $active
    fi
    for b in "${BINS[@]}"; do
        run rm -f "$D_BIN/$b" "$D_BASH/$b" "$D_ZSH/_$b" "$D_FISH/$b.fish"
    done
    for u in "${units[@]}"; do
        run rm -f "$D_UNIT/$(basename "$u")"
    done
    # Man pages are one per command (stackclone-source-push.1, ...): remove what is there.
    for m in "$D_MAN"/stackclone-*.1; do
        [ -e "$m" ] && run rm -f "$m"
    done
    run rm -rf "$D_DOC"
    [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && run systemctl daemon-reload
    echo "install.sh: removed. Kept /etc/stackclone (configs, keys) and /var/lib/stackclone" \
        "(state); remove them by hand if you mean to." >&2
    exit 0
fi

# --- binaries ------------------------------------------------------------------------------
if [ -z "$BIN_DIR" ]; then
    BIN_DIR=$ROOT/target/release
    run cargo build --release --locked -p stackclone-source -p stackclone-target -p stackclone-certs
fi
for b in "${BINS[@]}"; do
    [ -x "$BIN_DIR/$b" ] || [ "$DRY" = 1 ] || die "$BIN_DIR/$b is missing or not executable"
done
if [ "$DOCS" = 1 ] && [ "$DRY" = 0 ]; then
    # Fail before anything is written if a binary is too old to make its own docs.
    for b in "${BINS[@]}"; do
        for sub in completions man; do
            "$BIN_DIR/$b" "$sub" --help >/dev/null 2>&1 ||
                die "$BIN_DIR/$b has no \`$sub\` subcommand (an older build?); rebuild it, or pass --no-docs"
        done
    done
fi

run install -d -m 0755 "$D_BIN"
for b in "${BINS[@]}"; do
    if [ "$BIN_DIR/$b" -ef "$D_BIN/$b" ]; then
        echo "  $b is already in $D_BIN"
    else
        run install -m 0755 "$BIN_DIR/$b" "$D_BIN/$b"
    fi
done

# --- systemd units -------------------------------------------------------------------------
# Always replaced: local changes belong in drop-ins (systemctl edit), which survive this.
run install -d -m 0755 "$D_UNIT"
for u in "${units[@]}"; do
    dest=$D_UNIT/$(basename "$u")
    printf '+ sed s#/usr/local/bin/#%s/bin/# %s > %s\n' "$PREFIX" "$u" "$dest"
    if [ "$DRY" = 0 ]; then
        sed "s#/usr/local/bin/#$PREFIX/bin/#g" "$u" >"$dest.tmp"
        chmod 0644 "$dest.tmp"
        mv "$dest.tmp" "$dest"
    fi
done

# --- configs: seeded once, never overwritten -----------------------------------------------
run install -d -m 0700 "$D_ETC" "$D_ETC/conf.d"
seed() { # ROLE
    local dest=$D_ETC/$1.toml
    if [ -e "$dest" ]; then
        echo "  $dest exists: left as it is (the example is in $PREFIX/share/doc/stackclone/examples/$1/)"
    else
        run install -m 0600 "deploy/examples/$1/$1.toml" "$dest"
    fi
}
case "$ROLE" in
source) seed source ;;
target) seed target ;;
both) seed source && seed target ;;
esac
# Example stacks go to the docs only: a stack file in conf.d is live (the target would create
# and accept /opt/containers/nextcloud), so each host's are written by its admin.
run install -d -m 0755 "$D_DOC/examples/source/conf.d" "$D_DOC/examples/target/conf.d" \
    "$D_DOC/examples/target/overrides"
for f in deploy/examples/source/*.toml deploy/examples/source/conf.d/*.toml \
    deploy/examples/target/*.toml deploy/examples/target/conf.d/*.toml \
    deploy/examples/target/overrides/*.yml; do
    run install -m 0644 "$f" "$D_DOC/examples/${f#deploy/examples/}"
done
[ ! -f deploy/INSTALL.md ] || run install -m 0644 deploy/INSTALL.md "$D_DOC/INSTALL.md"

# --- state dir -----------------------------------------------------------------------------
run install -d -m 0700 "$D_STATE"

# --- completions and man pages, made by the binaries ---------------------------------------
if [ "$DOCS" = 1 ]; then
    run install -d -m 0755 "$D_BASH" "$D_ZSH" "$D_FISH" "$D_MAN"
    for b in "${BINS[@]}"; do
        run_to "$D_BASH/$b" "$BIN_DIR/$b" completions bash
        run_to "$D_ZSH/_$b" "$BIN_DIR/$b" completions zsh
        run_to "$D_FISH/$b.fish" "$BIN_DIR/$b" completions fish
        run "$BIN_DIR/$b" man "$D_MAN"
    done
    if [ "$DRY" = 0 ]; then
        chmod 0644 "$D_BASH"/stackclone-* "$D_ZSH"/_stackclone-* "$D_FISH"/stackclone-* "$D_MAN"/stackclone-*.1
    fi
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
fi

if [ "$DRY" = 1 ]; then
    echo "install.sh: dry run: nothing was changed" >&2
else
    cat >&2 <<EOF
install.sh: installed into ${DESTDIR:-/}.
Next (deploy/INSTALL.md has the details):
  1. certificates:  stackclone-certs init | token create | serve | enroll
  2. configs:       /etc/stackclone/{source,target}.toml, one file per stack in conf.d/
                    (examples: $PREFIX/share/doc/stackclone/examples/)
  3. start:         systemctl enable --now stackclone-target     (on the standby)
                    systemctl enable --now stackclone-source     (on the primary)
EOF
fi
