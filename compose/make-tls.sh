#!/usr/bin/env bash
# A private CA and the broker's certificate for the compose stack (compose/tls/, git-ignored):
#   bash compose/make-tls.sh
# Production: use your PKI; the broker's name must match what clients connect to (kafka).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p tls && cd tls
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -keyout ca.key -out ca.crt -subj "/CN=etrm-sync compose CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout broker.key -out broker.csr -subj "/CN=kafka"
openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
    -extfile <(printf "subjectAltName=DNS:kafka,DNS:localhost") -out broker.crt
cat broker.key broker.crt > broker.pem
chmod 600 ca.key broker.key broker.pem
chmod 644 ca.crt
rm -f broker.csr ca.srl
echo "written: $(pwd)/ca.crt, broker.pem"
