#!/usr/bin/env bash
# Installs the Debian packages Sluice's build and tests use, when they are missing.
#   postfix      smtp-sink / smtp-source: real SMTP peers for tests (Postfix itself is
#                configured "No configuration" and never started as the system MTA)
#   swaks        a real SMTP client for tests and the README example
#   dnsmasq-base a real DNS server the tests start on loopback (MX / A records)
#   gcc          building the Rust extension's C dependencies
set -euo pipefail

need=()
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v cc >/dev/null 2>&1 || need+=(gcc)
# strace counts fsyncs per message in the benchmark (bench/); optional elsewhere.
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v cargo >/dev/null 2>&1 || { echo "cargo (Rust) is required and not found" >&2; exit 1; }

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# Keep Postfix from becoming (and starting as) the system MTA: we only want its tools.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null >/dev/null
