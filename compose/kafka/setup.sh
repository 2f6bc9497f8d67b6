#!/usr/bin/env bash
# Topics and ACLs for etrm-sync, applied as the Kafka admin (idempotent: run it again at will).
# Least privilege, nothing else (the authorizer denies what no ACL allows):
#   etrm-intake    writes the two lanes (accepted records, replays it resumes)
#   etrm-worker    reads the lanes in its own consumer group, writes the reconciliation topic,
#                  and the lanes (replays and continuations any worker may resume)
#   etrm-operator  writes the lanes (replays from the command line)
# No application user may create, delete or alter topics, read another group's offsets, or read
# the reconciliation topic; desks never talk to Kafka at all.
set -euo pipefail
: "${KAFKA_ADMIN_PASSWORD:?}"
BOOTSTRAP=${KAFKA_BOOTSTRAP:-kafka:9093}
PRIORITY=${ETRM_TOPIC_PRIORITY:-settlements.sync.priority}
STANDARD=${ETRM_TOPIC_STANDARD:-settlements.sync.standard}
RECONCILIATION=${ETRM_TOPIC_RECONCILIATION:-settlements.reconciliation}
GROUP=${ETRM_KAFKA_GROUP_ID:-etrm-sync-workers}
PARTITIONS=${ETRM_KAFKA_PARTITIONS:-4}
admin=/tmp/admin.properties
cat > "$admin" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="${KAFKA_ADMIN_PASSWORD}";
ssl.truststore.type=PEM
ssl.truststore.location=/etc/kafka/tls/ca.crt
PROPS
bin=/opt/kafka/bin
for topic in "$PRIORITY" "$STANDARD" "$RECONCILIATION"; do
    "$bin/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$admin" \
        --create --if-not-exists --topic "$topic" --partitions "$PARTITIONS" --replication-factor 1
done
acl() { "$bin/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$admin" --add "$@"; }
for lane in "$PRIORITY" "$STANDARD"; do
    acl --allow-principal User:etrm-intake --operation Write --operation Describe --topic "$lane"
    acl --allow-principal User:etrm-worker --operation Read --operation Write --operation Describe --topic "$lane"
    acl --allow-principal User:etrm-operator --operation Write --operation Describe --topic "$lane"
done
acl --allow-principal User:etrm-worker --operation Write --operation Describe --topic "$RECONCILIATION"
acl --allow-principal User:etrm-worker --operation Read --operation Describe --group "$GROUP"
# The idempotent producer (ETRM_KAFKA_ENABLE_IDEMPOTENCE=true) needs this on the cluster.
for user in etrm-intake etrm-worker etrm-operator; do
    acl --allow-principal "User:$user" --operation IdempotentWrite --cluster
done
"$bin/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$admin" --list
