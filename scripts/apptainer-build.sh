#!/usr/bin/env bash
# Build the Apptainer / SingularityCE image from apptainer/roimae.def and any Docker image, not
# only the published one, so that the definition can be checked before a release:
#
#   docker save -o roimae.tar roimae:smoke                  # e.g. scripts/container-smoke.sh's image
#   scripts/apptainer-build.sh roimae.tar roimae.sif        # docker-archive: no registry, no daemon
#   scripts/apptainer-build.sh docker-daemon://roimae:smoke roimae.sif   # from the local engine
#   scripts/apptainer-build.sh docker://roimae/roimae:0.1.0 roimae.sif   # the published image
#   scripts/apptainer-build.sh --print-def roimae.tar       # only print the definition it builds
#
# Only the definition's Bootstrap and From lines change (to the source's); its labels,
# %runscript, %test and %help are built as they are, and `apptainer test` runs on the result.
# Settings: APPTAINER, the client (apptainer, else singularity); APPTAINER_BUILD_FLAGS, extra
# flags for `apptainer build` (e.g. --fakeroot where unprivileged builds need it).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
definition=$repo/apptainer/roimae.def
usage="usage: $0 [--print-def] SOURCE [SIF]   (SOURCE: FILE.tar, docker-archive://FILE.tar, docker-daemon://IMAGE:TAG or docker://IMAGE:TAG)"
fail() { printf 'apptainer-build: %s\n' "$*" >&2; exit 1; }

print_only=0
if [[ ${1:-} == --print-def ]]; then print_only=1; shift; fi
[[ $# -ge 1 && $# -le 2 ]] || fail "$usage"
source=$1

# The bootstrap agent and the From value of SOURCE.
case $source in
    docker-archive:*) bootstrap=docker-archive from=${source#docker-archive:} from=${from#//} ;;
    docker-daemon:*) bootstrap=docker-daemon from=${source#docker-daemon:} from=${from#//} ;;
    docker://*) bootstrap=docker from=${source#docker://} ;;
    *.tar) bootstrap=docker-archive from=$source ;;
    *) fail "$usage" ;;
esac
if [[ $bootstrap == docker-archive ]]; then
    [[ -f $from ]] || fail "no such archive: $from (make it with: docker save -o $from IMAGE)"
    from=$(cd "$(dirname "$from")" && pwd)/$(basename "$from")
fi

write_definition() {
    awk -v bootstrap="$bootstrap" -v from="$from" '
        /^Bootstrap:/ { print "Bootstrap: " bootstrap; seen++; next }
        /^From:/ { print "From: " from; seen++; next }
        { print }
        END { if (seen != 2) exit 1 }' "$definition" \
        || fail "$definition lacks its Bootstrap: or From: line"
}

if [[ $print_only == 1 ]]; then
    write_definition
    exit 0
fi
[[ $# == 2 ]] || fail "$usage"
sif=$2
APPTAINER=${APPTAINER:-$(command -v apptainer || command -v singularity || true)}
[[ -n $APPTAINER ]] || fail "neither apptainer nor singularity is installed (set APPTAINER)"
read -ra build_flags <<<"${APPTAINER_BUILD_FLAGS:-}"

work=$(mktemp -d "${TMPDIR:-/tmp}/roimae-apptainer.XXXXXX")
trap 'rm -rf "$work"' EXIT
write_definition >"$work/roimae.def"
"$APPTAINER" build --force "${build_flags[@]}" "$sif" "$work/roimae.def"
"$APPTAINER" test "$sif"
echo "built $sif from $bootstrap $from with $definition"
