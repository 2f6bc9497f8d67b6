#!/usr/bin/env bash
# Entry point of the compose stack's Kafka: on first start format the log dir with the SCRAM
# users (KRaft keeps credentials in its metadata log, so they exist before any client connects),
# then start the broker; kafka/setup.sh (the kafka-setup service) creates topics and ACLs.
set -euo pipefail
: "${KAFKA_ADMIN_PASSWORD:?}" "${KAFKA_INTAKE_PASSWORD:?}" "${KAFKA_WORKER_PASSWORD:?}" "${KAFKA_OPERATOR_PASSWORD:?}"
config=/tmp/server.properties
cp /etc/kafka/etrm/server.properties "$config"
printf '%s\n' "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"${KAFKA_ADMIN_PASSWORD}\";" >> "$config"
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
    /opt/kafka/bin/kafka-storage.sh format --config "$config" \
        --cluster-id "${KAFKA_CLUSTER_ID:-etrm-sync-compose-0001}" \
        --add-scram "SCRAM-SHA-512=[name=admin,password=${KAFKA_ADMIN_PASSWORD}]" \
        --add-scram "SCRAM-SHA-512=[name=etrm-intake,password=${KAFKA_INTAKE_PASSWORD}]" \
        --add-scram "SCRAM-SHA-512=[name=etrm-worker,password=${KAFKA_WORKER_PASSWORD}]" \
        --add-scram "SCRAM-SHA-512=[name=etrm-operator,password=${KAFKA_OPERATOR_PASSWORD}]"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$config"
