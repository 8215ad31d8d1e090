//! Integration tests of `KubeSource`: the real kube-rs client against `fake_api` (no real
//! API server exists on the development machine or in CI).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};

use super::fake_api::FakeApi;
use super::state::WatchKind;
use super::status::{LeaseLock, StatusConfig};
use super::{KubeOptions, KubeSource};
use crate::source::{Snapshot, Source};

const NS: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const NODES: &str = "/api/v1/nodes";
const NETPOL: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const CNP: &str = "/apis/cilium.io/v2/ciliumnetworkpolicies";
const CCNP: &str = "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies";
const ANP: &str = "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies";
const BANP: &str = "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies";
const SA: &str = "/api/v1/serviceaccounts";
const CALICO_NP: &str = "/apis/crd.projectcalico.org/v1/networkpolicies";
const CALICO_GNP: &str = "/apis/crd.projectcalico.org/v1/globalnetworkpolicies";
const CALICO_TIER: &str = "/apis/crd.projectcalico.org/v1/tiers";

fn pod(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "a", "labels": {"app": name}},
           "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
           "status": {"phase": "Running", "podIP": ip}})
}

fn cnp(name: &str, port: &str) -> Value {
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": name, "namespace": "a"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"toPorts": [{"ports": [{"port": port}]}]}]}})
}

fn options(status: Option<StatusConfig>) -> KubeOptions {
    KubeOptions {
        kinds: WatchKind::ALL.to_vec(),
        debounce: Duration::from_millis(30),
        max_delay: Duration::from_millis(500),
        status,
    }
}

async fn next(src: &mut KubeSource) -> Snapshot {
    tokio::time::timeout(Duration::from_secs(20), src.next())
        .await
        .expect("a snapshot within 20 s")
        .expect("snapshot")
}

/// Takes snapshots until one satisfies `cond`.
async fn next_until(
    src: &mut KubeSource,
    what: &str,
    cond: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = tokio::time::timeout_at(deadline, src.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("snapshot");
        if cond(&s) {
            return s;
        }
    }
}

fn pod_names(s: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = s.cluster.pods.iter().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

async fn fake_with_core() -> FakeApi {
    let fake = FakeApi::start(&[NS, PODS, NODES, NETPOL, CNP, CCNP, ANP, BANP]).await;
    // the ANP CRDs are not installed
    fake.set_missing(ANP, true);
    fake.set_missing(BANP, true);
    fake.apply(
        NS,
        json!({"metadata": {"name": "a", "labels": {"team": "x"}}}),
    );
    fake.apply(
        NODES,
        json!({"metadata": {"name": "n1"},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}),
    );
    fake.apply(PODS, pod("web", "10.0.0.1"));
    fake.apply(CNP, cnp("db", "5432"));
    fake
}

#[tokio::test]
async fn calico_policies_service_accounts_and_pod_accounts_are_read() {
    let fake = FakeApi::start(&[
        NS,
        PODS,
        NODES,
        NETPOL,
        CNP,
        CCNP,
        ANP,
        BANP,
        SA,
        CALICO_NP,
        CALICO_GNP,
        CALICO_TIER,
    ])
    .await;
    for c in [ANP, BANP, CALICO_NP, CALICO_GNP, CALICO_TIER] {
        fake.set_missing(c, true);
    }
    fake.apply(NS, json!({"metadata": {"name": "a"}}));
    fake.apply(
        SA,
        json!({"metadata": {"name": "robot", "namespace": "a", "labels": {"role": "ci"}}}),
    );
    let mut p = pod("web", "10.0.0.1");
    p["spec"]["serviceAccountName"] = json!("robot");
    fake.apply(PODS, p);
    let mut src = KubeSource::with_options(fake.client(), options(None));
    let s = next(&mut src).await;
    assert_eq!(s.cluster.service_accounts.len(), 1);
    assert_eq!(s.cluster.service_accounts[0].labels["role"], "ci");
    assert_eq!(s.cluster.pods[0].service_account(), "robot");
    assert!(
        s.objects.is_empty(),
        "the Calico CRDs are not installed yet"
    );

    // Calico gets installed: its CRDs appear and their watches start
    for c in [CALICO_NP, CALICO_GNP, CALICO_TIER] {
        fake.set_missing(c, false);
    }
    fake.apply(
        CALICO_TIER,
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "Tier",
               "metadata": {"name": "security"}, "spec": {"order": 100}}),
    );
    fake.apply(
        CALICO_GNP,
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
               "metadata": {"name": "deny-ssh-external"},
               "spec": {"tier": "security", "order": 10, "selector": "all()",
                        "ingress": [{"action": "Deny", "protocol": "TCP",
                                     "source": {"nets": ["0.0.0.0/0"], "notNets": ["10.0.0.0/8"]},
                                     "destination": {"ports": [22]}}]}}),
    );
    fake.apply(
        CALICO_NP,
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "api", "namespace": "a"},
               "spec": {"selector": "app == 'api'",
                        "ingress": [{"action": "Allow",
                                     "source": {"serviceAccounts": {"selector": "role == 'ci'"}}}]}}),
    );
    let s = next_until(&mut src, "the Calico objects", |s| s.objects.len() == 3).await;
    let mut names: Vec<String> = s.objects.iter().map(|o| o.reference.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "CalicoNetworkPolicy a/api",
            "GlobalNetworkPolicy deny-ssh-external",
            "Tier security"
        ]
    );
    for o in &s.objects {
        assert!(
            o.translate().is_ok(),
            "{}: {:?}",
            o.reference,
            o.translate()
        );
    }
    // a selector error names the object and the field
    fake.apply(
        CALICO_NP,
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "api", "namespace": "a"},
               "spec": {"selector": "app = 'api'"}}),
    );
    let s = next_until(&mut src, "the broken policy", |s| {
        s.objects.iter().any(|o| o.translate().is_err())
    })
    .await;
    let bad = s
        .objects
        .iter()
        .find_map(|o| o.translate().err())
        .expect("an invalid object");
    assert_eq!(bad[0].path, "spec.selector");
    assert_eq!(bad[0].object.as_deref(), Some("CalicoNetworkPolicy a/api"));
}

#[tokio::test]
async fn first_snapshot_after_every_kind_synced_then_changes_and_a_crd_that_appears() {
    let fake = fake_with_core().await;
    let mut src = KubeSource::with_options(fake.client(), options(None));
    let s = next(&mut src).await;
    assert!(src.ready());
    assert_eq!(s.cluster.namespaces.len(), 1);
    assert_eq!(s.cluster.nodes[0].ip.to_string(), "192.0.2.10");
    assert_eq!(pod_names(&s), ["web"]);
    assert_eq!(s.objects.len(), 1, "{:?}", s.errors);
    for c in [NS, PODS, NODES, NETPOL, CNP, CCNP] {
        assert_eq!(fake.lists(c), 1, "{c} listed once");
    }

    fake.apply(PODS, pod("db", "10.0.0.2"));
    let s = next_until(&mut src, "the new pod", |s| s.cluster.pods.len() == 2).await;
    assert_eq!(pod_names(&s), ["db", "web"]);

    // the AdminNetworkPolicy CRD gets installed: its watch starts (backoff retries)
    fake.set_missing(ANP, false);
    fake.apply(
        ANP,
        json!({"metadata": {"name": "guard"},
               "spec": {"priority": 10, "subject": {"namespaces": {}},
                        "ingress": [{"name": "deny", "action": "Deny", "from": [{"namespaces": {}}]}]}}),
    );
    let s = next_until(&mut src, "the ANP", |s| s.objects.len() == 2).await;
    assert!(s
        .objects
        .iter()
        .any(|o| o.reference.kind == policy_model::policy::Kind::AdminNetworkPolicy));
}

#[tokio::test]
async fn no_snapshot_while_a_kind_cannot_be_listed() {
    let fake = fake_with_core().await;
    fake.set_forbidden(PODS, true);
    let mut src = KubeSource::with_options(fake.client(), options(None));
    // nothing may come while pods are forbidden (bounded wait for an absence)
    let early = tokio::time::timeout(Duration::from_millis(1500), src.next()).await;
    assert!(early.is_err(), "no snapshot before pods are listed");
    assert!(!src.ready());
    fake.set_forbidden(PODS, false);
    let s = next(&mut src).await;
    assert!(src.ready());
    assert_eq!(pod_names(&s), ["web"]);
}

#[tokio::test]
async fn a_dropped_stream_resumes_and_410_gone_lists_again() {
    let fake = fake_with_core().await;
    let mut src = KubeSource::with_options(fake.client(), options(None));
    next(&mut src).await;
    let watches = fake.watches(PODS);

    // a bookmark moves the watcher's resourceVersion without any change
    fake.bookmark(PODS);
    // the connection drops; a change happens meanwhile; the watcher resumes from its
    // resourceVersion without listing again
    fake.drop_streams(PODS);
    fake.apply(PODS, pod("db", "10.0.0.2"));
    next_until(&mut src, "the pod added during the reconnect", |s| {
        s.cluster.pods.len() == 2
    })
    .await;
    assert_eq!(fake.lists(PODS), 1, "resumed, not re-listed");
    assert!(fake.watches(PODS) > watches, "a new watch");

    // the history is compacted while a pod is deleted: the watch gets 410 Gone and the
    // watcher lists again, which is the only way to learn of the deletion
    fake.delete_and_expire(PODS, Some("a"), "web");
    let s = next_until(&mut src, "the re-list without web", |s| {
        s.cluster.pods.len() == 1
    })
    .await;
    assert_eq!(pod_names(&s), ["db"]);
    assert_eq!(fake.lists(PODS), 2, "re-listed after 410");

    // a plain delete arrives as a DELETED event
    fake.delete(PODS, Some("a"), "db");
    next_until(&mut src, "no pods", |s| s.cluster.pods.is_empty()).await;
}

#[tokio::test]
async fn a_bookmark_lets_the_watch_resume_after_compaction_without_listing() {
    let fake = fake_with_core().await;
    let mut src = KubeSource::with_options(fake.client(), options(None));
    next(&mut src).await;
    // other kinds change: the cluster's resourceVersion moves, pods see no event
    for i in 0..5 {
        fake.apply(NS, json!({"metadata": {"name": format!("n{i}")}}));
    }
    let rv = fake.bookmark(PODS);
    fake.wait_for("the bookmark sent", 20, |g| g.queued(PODS) >= rv)
        .await;
    // history before the bookmark is compacted and the stream drops: a watcher that
    // kept its old resourceVersion would get 410 and list again
    fake.expire_before(PODS, rv);
    fake.apply(PODS, pod("db", "10.0.0.2"));
    next_until(&mut src, "the pod after the reconnect", |s| {
        s.cluster.pods.len() == 2
    })
    .await;
    assert_eq!(fake.lists(PODS), 1, "resumed from the bookmark");
    assert_eq!(fake.last_watch_from(PODS), rv);
}

#[tokio::test]
async fn a_burst_of_changes_is_one_snapshot() {
    let fake = fake_with_core().await;
    let mut src = KubeSource::with_options(
        fake.client(),
        KubeOptions {
            debounce: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            ..options(None)
        },
    );
    next(&mut src).await;
    for i in 0..20 {
        fake.apply(PODS, pod(&format!("p{i}"), &format!("10.0.1.{i}")));
    }
    let s = next(&mut src).await;
    assert_eq!(s.cluster.pods.len(), 21, "the whole burst in one snapshot");
    let local = s
        .cluster
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some("n1"))
        .count();
    assert_eq!(local, 21, "this node's pods by spec.nodeName");
}

fn valid_condition(o: &Value) -> Option<(String, String)> {
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Valid")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

#[tokio::test]
async fn the_leader_writes_valid_false_with_the_error_then_valid_true_and_events() {
    let fake = fake_with_core().await;
    fake.apply(CNP, cnp("bad", "99999"));
    let cfg = StatusConfig {
        namespace: "ward-test".into(),
        lease_name: "ward-status-writer".into(),
        identity: "node-1".into(),
        lease_duration: Duration::from_secs(15),
    };
    let src = KubeSource::with_options(fake.client(), options(Some(cfg)));
    // the agent loop: keep taking snapshots
    let driver = tokio::spawn(async move {
        let mut src = src;
        while src.next().await.is_ok() {}
    });
    let cond = |key: &'static str, want: &'static str| {
        move |g: &super::fake_api::Inner| {
            g.item(CNP, key)
                .and_then(valid_condition)
                .is_some_and(|(s, _)| s == want)
        }
    };
    fake.wait_for("Valid=False on a/bad", 20, cond("a/bad", "False"))
        .await;
    let (_, msg) = valid_condition(&fake.item(CNP, "a/bad").unwrap()).unwrap();
    assert!(
        msg.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{msg}"
    );
    assert!(msg.contains("out of range"), "{msg}");
    fake.wait_for("Valid=True on a/db", 20, cond("a/db", "True"))
        .await;

    let lease = fake
        .other("/apis/coordination.k8s.io/v1/namespaces/ward-test/leases/ward-status-writer")
        .expect("the lease");
    assert_eq!(lease["spec"]["holderIdentity"], "node-1");
    fake.wait_for("a PolicyInvalid Event", 20, |g| {
        g.other.iter().any(|(p, e)| {
            p.contains("/events/")
                && e["reason"] == "PolicyInvalid"
                && e["regarding"]["name"] == "bad"
        })
    })
    .await;

    // fixed: Valid=True, and a PolicyValid Event
    fake.apply(CNP, cnp("bad", "5433"));
    fake.wait_for("Valid=True on a/bad", 20, cond("a/bad", "True"))
        .await;
    driver.abort();
}

#[tokio::test]
async fn a_lease_held_by_another_agent_is_taken_only_once_expired() {
    let fake = FakeApi::start(&[]).await;
    let cfg = |id: &str| StatusConfig {
        namespace: "ward-test".into(),
        lease_name: "l".into(),
        identity: id.into(),
        lease_duration: Duration::from_secs(15),
    };
    let a = LeaseLock::new(fake.client(), &cfg("a"));
    let b = LeaseLock::new(fake.client(), &cfg("b"));
    assert!(a.try_acquire().await.unwrap(), "a creates the lease");
    assert!(!b.try_acquire().await.unwrap(), "b waits while a renews");
    assert!(a.try_acquire().await.unwrap(), "a renews");
    // a stops renewing: make its renewTime old
    let path = "/apis/coordination.k8s.io/v1/namespaces/ward-test/leases/l";
    fake.edit_other(path, |l| {
        l["spec"]["renewTime"] = json!("2000-01-01T00:00:00.000000Z");
    });
    assert!(
        b.try_acquire().await.unwrap(),
        "b takes over an expired lease"
    );
    assert!(!a.try_acquire().await.unwrap(), "a lost it");
    let l = fake.other(path).unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "b");
    assert_eq!(l["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_failing_watch_is_logged_at_warn() {
    use crate::telemetry::capture::Captured;
    use crate::telemetry::{subscriber, LogFormat};

    let out = Captured::default();
    let filter = tracing_subscriber::EnvFilter::new("info");
    // the test's runtime runs every task on this thread: they all log here
    let _log =
        tracing::subscriber::set_default(subscriber(filter, LogFormat::Text, out.clone(), false));
    let fake = fake_with_core().await;
    fake.set_forbidden(PODS, true);
    let mut src = KubeSource::with_options(fake.client(), options(None));
    let logged = async {
        while !out
            .text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("watch failed") && l.contains("Pod"))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        s = src.next() => panic!("a snapshot while pods are forbidden: {:?}", s.map(|s| s.cluster)),
        r = tokio::time::timeout(Duration::from_secs(10), logged) => {
            assert!(r.is_ok(), "no warning in:\n{}", out.text());
        }
    }
}
