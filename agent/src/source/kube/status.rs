//! Writing the `Valid` condition of CNPs and CCNPs, by one agent only.
//!
//! Leader election is a small hand-rolled loop on a `coordination.k8s.io/v1` Lease:
//! kube-rs 2.0's runtime has no leader election, and the protocol is short (create the
//! Lease, or take it over when its holder stopped renewing, with the Lease's
//! resourceVersion as the guard against two agents taking it at once; renew at a third
//! of its duration). Status is best effort: a failed write is retried on the next
//! snapshot, and enforcement never waits for it.

use std::collections::HashMap;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use ::kube::runtime::events::{Event, EventType, Recorder, Reporter};
use ::kube::Client;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::state::{PolicyItem, Validity};

/// A status write Ward wants: the object and its new `Valid` condition.
#[derive(Clone, Debug)]
pub struct StatusWant {
    pub item: PolicyItem,
    pub want: Validity,
}

/// The objects whose `Valid` condition differs from what Ward wants.
pub fn wanted<'a>(items: impl Iterator<Item = &'a PolicyItem>) -> Vec<StatusWant> {
    items
        .filter(|i| i.kind.has_valid_status())
        .filter_map(|i| {
            let want = i.desired();
            (i.observed().as_ref() != Some(&want)).then(|| StatusWant {
                item: i.clone(),
                want,
            })
        })
        .collect()
}

/// The new `status.conditions`: Ward's `Valid` replaced or added, the others kept.
pub fn conditions(item: &PolicyItem, want: &Validity, now: DateTime<Utc>) -> Vec<Value> {
    let status = if want.valid { "True" } else { "False" };
    let reason = if want.valid { "Valid" } else { "Invalid" };
    let mut out: Vec<Value> = item
        .conditions
        .iter()
        .filter(|c| c.get("type").and_then(Value::as_str) != Some("Valid"))
        .cloned()
        .collect();
    out.push(json!({
        "type": "Valid",
        "status": status,
        "reason": reason,
        "message": want.message,
        "lastTransitionTime": now.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
    }));
    out
}

/// Settings of the status writer.
#[derive(Clone, Debug)]
pub struct StatusConfig {
    /// Namespace of the Lease (the agent's namespace).
    pub namespace: String,
    pub lease_name: String,
    /// This agent's identity in the Lease (its pod or node name).
    pub identity: String,
    pub lease_duration: Duration,
}

impl StatusConfig {
    /// From the environment the DaemonSet sets: `POD_NAMESPACE`, `POD_NAME`/`NODE_NAME`.
    pub fn from_env() -> StatusConfig {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        StatusConfig {
            namespace: env("POD_NAMESPACE").unwrap_or_else(|| "ward-system".into()),
            lease_name: "ward-status-writer".into(),
            identity: env("POD_NAME")
                .or_else(|| env("NODE_NAME"))
                .unwrap_or_else(|| format!("ward-{}", std::process::id())),
            lease_duration: Duration::from_secs(15),
        }
    }
}

/// A Lease held by at most one agent.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(client: Client, cfg: &StatusConfig) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, &cfg.namespace),
            name: cfg.lease_name.clone(),
            identity: cfg.identity.clone(),
            duration: cfg.lease_duration,
        }
    }

    /// Takes or renews the Lease; `Ok(true)` when this agent holds it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, ::kube::Error> {
        let now = MicroTime(Utc::now());
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(::kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let mine = spec.holder_identity.as_deref() == Some(&self.identity);
                let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                    (Some(t), Some(d)) => {
                        t.0 + k8s_openapi::chrono::Duration::seconds(i64::from(d)) < now.0
                    }
                    _ => true,
                };
                if !mine && !expired {
                    return Ok(false);
                }
                if !mine {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(secs);
                // resourceVersion is kept: a concurrent taker gets 409 Conflict
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(::kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

/// Runs the status writer: holds leadership through the Lease and, while leader,
/// writes the wanted conditions (the latest list on `rx`) and an Event per change.
pub async fn run(client: Client, cfg: StatusConfig, mut rx: watch::Receiver<Vec<StatusWant>>) {
    let lock = LeaseLock::new(client.clone(), &cfg);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ward-agent".into(),
            instance: Some(cfg.identity.clone()),
        },
    );
    let renew = cfg.lease_duration / 3;
    let mut leader = false;
    // what this agent wrote, so that a lagging watch does not cause rewrites
    let mut written: HashMap<(String, Option<String>, String), Validity> = HashMap::new();
    // The Lease is tried on its own clock only (not per snapshot), so that a thousand
    // agents that are not leader cost the API server one GET each per period.
    let mut tick = tokio::time::interval(renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => match lock.try_acquire().await {
                Ok(l) => {
                    if l != leader {
                        tracing::info!(leader = l, "status writer leadership changed");
                        written.clear();
                    }
                    leader = l;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the status Lease; not writing status");
                    leader = false;
                }
            },
            changed = rx.changed() => {
                if changed.is_err() {
                    return; // the source is gone
                }
            }
        }
        if !leader {
            continue;
        }
        let wants = rx.borrow_and_update().clone();
        // forget what the watch has caught up with, so that a recreated object with the
        // same error is written again
        written.retain(|k, _| {
            wants.iter().any(|w| {
                (w.item.kind.name(), &w.item.namespace, &w.item.name) == (k.0.as_str(), &k.1, &k.2)
            })
        });
        for w in wants {
            let key = (
                w.item.kind.name().to_string(),
                w.item.namespace.clone(),
                w.item.name.clone(),
            );
            if written.get(&key) == Some(&w.want) {
                continue;
            }
            match write(&client, &recorder, &w).await {
                Ok(()) => {
                    written.insert(key, w.want);
                }
                Err(e) => tracing::warn!(
                    object = %format!("{} {}", w.item.kind.name(), w.item.name),
                    error = %e,
                    "cannot write the Valid condition"
                ),
            }
        }
    }
}

async fn write(client: &Client, recorder: &Recorder, w: &StatusWant) -> Result<(), ::kube::Error> {
    let ar = w.item.kind.api_resource();
    let api: Api<DynamicObject> = match &w.item.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let patch = json!({ "status": { "conditions": conditions(&w.item, &w.want, Utc::now()) } });
    api.patch_status(&w.item.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let reference = ObjectReference {
        api_version: Some(ar.api_version.clone()),
        kind: Some(ar.kind.clone()),
        name: Some(w.item.name.clone()),
        namespace: w.item.namespace.clone(),
        uid: w.item.uid.clone(),
        ..ObjectReference::default()
    };
    let (type_, reason) = if w.want.valid {
        (EventType::Normal, "PolicyValid")
    } else {
        (EventType::Warning, "PolicyInvalid")
    };
    let mut note = w.want.message.clone();
    // the Event API caps a note at 1 KiB
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    recorder
        .publish(
            &Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Validate".into(),
                secondary: None,
            },
            &reference,
        )
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::super::state::{State, Update, WatchKind};
    use super::*;
    use ::kube::runtime::watcher;

    fn apply(s: &mut State, v: Value) {
        s.apply(
            WatchKind::CiliumNetworkPolicy,
            Update::Event(watcher::Event::Apply(serde_json::from_value(v).unwrap())),
        );
    }

    #[test]
    fn only_objects_whose_condition_differs_are_written() {
        let mut s = State::new(&[WatchKind::CiliumNetworkPolicy]);
        apply(
            &mut s,
            json!({"metadata": {"name": "bad", "namespace": "a"},
                   "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["nowhere"]}]},
                   "status": {"conditions": [{"type": "Other", "status": "True"}]}}),
        );
        let wants = wanted(s.policies());
        assert_eq!(wants.len(), 1);
        assert!(!wants[0].want.valid);
        assert!(
            wants[0].want.message.contains("toEntities"),
            "{}",
            wants[0].want.message
        );
        let conds = conditions(&wants[0].item, &wants[0].want, Utc::now());
        assert_eq!(conds.len(), 2, "other conditions are kept");
        assert_eq!(conds[1]["status"], "False");

        // once the watch shows the written condition, nothing more is wanted
        apply(
            &mut s,
            json!({"metadata": {"name": "bad", "namespace": "a"},
                   "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["nowhere"]}]},
                   "status": {"conditions": conds}}),
        );
        assert!(wanted(s.policies()).is_empty());

        // fixed: Valid=True is wanted
        apply(
            &mut s,
            json!({"metadata": {"name": "bad", "namespace": "a"},
                   "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["world"]}]},
                   "status": {"conditions": conds}}),
        );
        let wants = wanted(s.policies());
        assert_eq!(wants.len(), 1);
        assert!(wants[0].want.valid);
    }
}
