#!/usr/bin/env bash
# Make medrl's Snakemake profiles available by name (`snakemake --profile slurm all`).
# Snakemake looks profiles up in the current directory, then in the user config dir
# ($XDG_CONFIG_HOME/snakemake, default ~/.config/snakemake) and the site config dir
# (first entry of $XDG_CONFIG_DIRS + /snakemake, default /etc/xdg/snakemake). This links
# every folder under workflow/profiles/ into the user config dir; re-running is harmless.
# An existing profile of the same name that is not our link is left alone (exit 1).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake"
mkdir -p "$DEST"
status=0
for profile in "$HERE"/*/; do
  profile="${profile%/}"
  name="$(basename "$profile")"
  [ -f "$profile/config.yaml" ] || continue
  link="$DEST/$name"
  if [ -L "$link" ]; then
    ln -sfn "$profile" "$link"
  elif [ -e "$link" ]; then
    echo "install.sh: $link exists and is not a link to $profile; leaving it alone" >&2
    status=1
    continue
  else
    ln -s "$profile" "$link"
  fi
  echo "profile '$name': $link -> $profile"
done
exit "$status"
