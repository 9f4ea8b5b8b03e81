#!/bin/sh
# msld notification command (notify_command = "/etc/msl/notify.sh"): run
# once per event with the event in its environment:
#
#   MSL_EVENT    stable event name (takeover, peer_lost, split_brain_refused, ...)
#   MSL_MESSAGE  the text
#   MSL_NODE     this node's id
#   MSL_TIME_MS  when, in milliseconds since the Unix epoch
#   MSL_<FIELD>  the event's structured fields, as they apply: MSL_ROLE,
#                MSL_GENERATION, MSL_PEER, MSL_REASON, MSL_PATH,
#                MSL_STRATEGY, MSL_RULE, MSL_REMAINING, MSL_TOTAL, ...
#
# Which events run it: notify_events (all when unset); resync progress
# runs it at most once per notify_progress_interval_s (default 60 s).
#
# msld kills it after a few seconds and never waits for it on the data
# path: keep it short. This example sends what an administrator must act
# on to syslog (and so to the journal) and, if MSL_NOTIFY_MAIL names an
# address and a `mail` command exists, by mail. Progress and link flaps
# only go to syslog at a lower priority. Exit 0: a failure is counted by
# msld (notify command failures) but changes nothing else.

event=${MSL_EVENT:-unknown}
message=${MSL_MESSAGE:-}
node=${MSL_NODE:-?}

case "$event" in
    split_brain_refused | disk_failed | cannot_take_over | mirror_shut_down)
        priority=crit ;;
    takeover | peer_down | degraded | connection_refused | verify_aborted | warning)
        priority=warning ;;
    resync_progress)
        # Once a second during a resync: not worth a line each.
        exit 0 ;;
    *)
        priority=notice ;;
esac

logger -t "msl-notify" -p "daemon.$priority" "node $node $event: $message" 2>/dev/null || true

if [ -n "${MSL_NOTIFY_MAIL:-}" ] && command -v mail >/dev/null 2>&1; then
    case "$priority" in
        crit | warning)
            printf '%s\n\nnode %s, event %s, at %s ms since the epoch\n' \
                "$message" "$node" "$event" "${MSL_TIME_MS:-?}" |
                mail -s "msl node $node: $event" "$MSL_NOTIFY_MAIL" 2>/dev/null || true ;;
    esac
fi
exit 0
