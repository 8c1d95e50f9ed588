#!/bin/bash
# Build dist/tokenpak_<version>_all.deb from a copy of the checkout, so the repo stays clean.
#
#   packaging/build-deb.sh [--worktree] [--install-deps] [--out DIR] [--no-lintian]
#
# --worktree      build the working tree (tracked and untracked, not ignored files) instead
#                 of `git archive HEAD`
# --install-deps  apt-get install missing build dependencies (also when CI=true; needs root)
# --out DIR       where the .deb goes (default: dist/ in the checkout)
# --no-lintian    skip lintian (it runs when installed and fails the build on any error)
#
# The version comes from tokenpak/__init__.py; packaging/debian/ is copied to debian/ in a
# temporary tree and the package is built there with dpkg-buildpackage.
set -euo pipefail

die() { echo "build-deb: error: $*" >&2; exit 1; }

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel) || die "not inside a git checkout"
worktree=0
install_deps=0
[ "${CI:-}" = true ] && install_deps=1
out="$repo/dist"
run_lintian=1
while [ $# -gt 0 ]; do
    case "$1" in
        --worktree) worktree=1 ;;
        --install-deps) install_deps=1 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift ;;
        --no-lintian) run_lintian=0 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

version=$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$repo/tokenpak/__init__.py")
[ -n "$version" ] || die "no __version__ in tokenpak/__init__.py"

# Build dependencies (Build-Depends of packaging/debian/control, plus the tools used here).
deps="debhelper dh-python python3-all python3-setuptools dpkg-dev"
[ $run_lintian = 1 ] && deps="$deps lintian"
missing=""
for pkg in $deps; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
        || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ $install_deps = 1 ] && [ "$(id -u)" = 0 ]; then
        echo "build-deb: installing$missing"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
    else
        die "missing build dependencies:$missing (run as root with --install-deps, or apt-get install them)"
    fi
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tokenpak-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src="$tmp/tokenpak-$version"
mkdir "$src"
if [ $worktree = 1 ]; then
    # every file git would commit now, including new ones not yet added
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$src"
    what="working tree"
else
    git -C "$repo" archive --format=tar HEAD | tar -xf - -C "$src"
    what="HEAD $(git -C "$repo" rev-parse --short HEAD)"
fi
[ -d "$src/packaging/debian" ] || die "packaging/debian is not in the $what"
[ -f "$src/setup.py" ] || [ -f "$src/pyproject.toml" ] || die "no setup.py or pyproject.toml in the $what"
cp -r "$src/packaging/debian" "$src/debian"

# The package version follows tokenpak/__init__.py: add a changelog entry when they differ.
top=$(sed -n '1s/^tokenpak (\([^)]*\)).*/\1/p' "$src/debian/changelog")
if [ "$top" != "$version" ]; then
    maint=$(sed -n 's/^Maintainer: //p' "$src/debian/control")
    { printf 'tokenpak (%s) unstable; urgency=medium\n\n  * Built from the %s.\n\n -- %s  %s\n\n' \
        "$version" "$what" "$maint" "$(date -R)"; cat "$src/debian/changelog"; } > "$tmp/changelog"
    mv "$tmp/changelog" "$src/debian/changelog"
fi

echo "build-deb: building tokenpak $version from the $what"
if ! (cd "$src" && dpkg-buildpackage -us -uc -b) > "$tmp/build.log" 2>&1; then
    tail -n 60 "$tmp/build.log" >&2
    die "dpkg-buildpackage failed (last lines above)"
fi
deb="tokenpak_${version}_all.deb"
[ -f "$tmp/$deb" ] || die "dpkg-buildpackage made no $deb"
mkdir -p "$out"
cp "$tmp/$deb" "$out/$deb"

if [ $run_lintian = 1 ]; then
    # errors fail the build; warnings are shown
    if ! lintian --fail-on error --tag-display-limit 0 "$tmp"/tokenpak_*.changes; then
        die "lintian found errors"
    fi
fi
echo "build-deb: $out/$deb"
