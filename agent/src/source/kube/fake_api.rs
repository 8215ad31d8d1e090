//! Integration tests of the Kubernetes source: the real kube-rs client and watchers
//! against an HTTP server in the test (hyper) that speaks the API server's list/watch
//! protocol: resourceVersions, chunked watch streams, bookmarks, `410 Gone` for expired
//! versions, dropped streams, 404 for kinds whose CRD is not installed, status patches,
//! Leases and Events.
//!
//! No real API server (nor kind/minikube) exists on the development machine or in CI,
//! so this fake is as close as the tests get; it implements only what the agent uses.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// One watched collection (`/api/v1/pods`, `/apis/cilium.io/v2/ciliumnetworkpolicies`).
#[derive(Default)]
struct Res {
    items: BTreeMap<String, Value>,
    /// (resourceVersion, type, object) of every change, for watches to replay.
    log: Vec<(u64, &'static str, Value)>,
    missing: bool,
    /// Answers 403 (RBAC does not allow the agent to list it).
    forbidden: bool,
    /// Watches from a resourceVersion older than this get `410 Gone`.
    gone_before: u64,
    /// Bumped to end every open watch stream of the collection.
    generation: u64,
    lists: usize,
    watches: usize,
    /// The resourceVersion the last watch started from.
    last_from: u64,
    /// The newest event a watch stream has handed to the connection.
    queued: u64,
}

#[derive(Default)]
pub struct Inner {
    rv: u64,
    res: BTreeMap<String, Res>,
    /// Objects outside the watched collections (Leases, Events), by path.
    pub other: BTreeMap<String, Value>,
}

impl Inner {
    /// See `FakeApi::queued`.
    pub fn queued(&self, collection: &str) -> u64 {
        self.res.get(collection).map_or(0, |r| r.queued)
    }

    /// An object of a watched collection by `namespace/name` (`/name` when cluster-scoped).
    pub fn item(&self, collection: &str, key: &str) -> Option<&Value> {
        self.res.get(collection)?.items.get(key)
    }
}

/// The fake API server.
pub struct FakeApi {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "message": message, "code": code})
}

fn key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or_default(),
        o["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn query(q: Option<&str>, k: &str) -> Option<String> {
    q?.split('&').find_map(|kv| {
        let (a, b) = kv.split_once('=')?;
        (a == k).then(|| b.to_string())
    })
}

/// Splits `/apis/G/V/namespaces/NS/PLURAL/NAME[/status]` into (collection, ns, name, sub).
fn split(path: &str) -> (String, Option<String>, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let base = if parts.first() == Some(&"api") { 2 } else { 3 };
    let (prefix, rest) = parts.split_at(base.min(parts.len()));
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let plural = rest.first().copied().unwrap_or_default();
    let collection = format!("/{}/{}", prefix.join("/"), plural);
    (
        collection,
        ns,
        rest.get(1).map(|s| s.to_string()),
        rest.get(2).map(|s| s.to_string()),
    )
}

impl FakeApi {
    /// Serves the given collections; any other watched collection answers 404.
    pub async fn start(collections: &[&str]) -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut inner = Inner::default();
        for c in collections {
            inner.res.insert((*c).to_string(), Res::default());
        }
        let inner = Arc::new(Mutex::new(inner));
        let (changed, _) = watch::channel(0);
        let (i2, c2) = (inner.clone(), changed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (i3, c3) = (i2.clone(), c2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (i4, c4) = (i3.clone(), c3.clone());
                        async move { Ok::<_, Infallible>(handle(req, i4, c4).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeApi {
            addr,
            inner,
            changed,
            task,
        }
    }

    pub fn client(&self) -> ::kube::Client {
        let config = ::kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        ::kube::Client::try_from(config).unwrap()
    }

    fn change(&self, f: impl FnOnce(&mut Inner)) {
        let rv = {
            let mut g = self.inner.lock().unwrap();
            f(&mut g);
            g.rv
        };
        self.changed.send_replace(rv);
    }

    /// Creates or updates an object, as a user's `kubectl apply` would.
    pub fn apply(&self, collection: &str, mut o: Value) {
        self.change(|g| {
            g.rv += 1;
            let rv = g.rv;
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            let r = g.res.entry(collection.into()).or_default();
            let k = key(&o);
            let ty = if r.items.contains_key(&k) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            r.items.insert(k, o.clone());
            r.log.push((rv, ty, o));
        });
    }

    pub fn delete(&self, collection: &str, ns: Option<&str>, name: &str) {
        self.change(|g| {
            g.rv += 1;
            let rv = g.rv;
            let r = g.res.get_mut(collection).unwrap();
            if let Some(mut o) = r
                .items
                .remove(&format!("{}/{name}", ns.unwrap_or_default()))
            {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                r.log.push((rv, "DELETED", o));
            }
        });
    }

    /// Deletes an object while expiring every older resourceVersion, as etcd compaction
    /// does: watchers get `410 Gone` and must list again to notice the deletion.
    pub fn delete_and_expire(&self, collection: &str, ns: Option<&str>, name: &str) {
        self.change(|g| {
            g.rv += 1;
            let rv = g.rv;
            let r = g.res.get_mut(collection).unwrap();
            r.items
                .remove(&format!("{}/{name}", ns.unwrap_or_default()));
            r.gone_before = rv + 1;
            r.log.clear();
            r.generation += 1;
        });
    }

    /// Ends the open watch streams of a collection (a dropped connection).
    pub fn drop_streams(&self, collection: &str) {
        self.change(|g| g.res.get_mut(collection).unwrap().generation += 1);
    }

    /// Sends a BOOKMARK with a new resourceVersion to open watches; returns it.
    pub fn bookmark(&self, collection: &str) -> u64 {
        let mut out = 0;
        self.change(|g| {
            g.rv += 1;
            let rv = g.rv;
            // as the API server sends it: a type and only a resourceVersion
            let bm = json!({"apiVersion": "v1", "kind": "Bookmark",
                            "metadata": {"resourceVersion": rv.to_string()}});
            g.res
                .get_mut(collection)
                .unwrap()
                .log
                .push((rv, "BOOKMARK", bm));
            out = rv;
        });
        out
    }

    /// Compacts a collection's history: watches from before `rv` get `410 Gone`; open
    /// streams end.
    pub fn expire_before(&self, collection: &str, rv: u64) {
        self.change(|g| {
            let r = g.res.get_mut(collection).unwrap();
            r.gone_before = rv;
            r.log.retain(|(v, _, _)| *v >= rv);
            r.generation += 1;
        });
    }

    /// The resourceVersion the last watch of the collection started from.
    pub fn last_watch_from(&self, collection: &str) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .res
            .get(collection)
            .map_or(0, |r| r.last_from)
    }

    /// Installs or removes a collection (a CRD).
    pub fn set_missing(&self, collection: &str, missing: bool) {
        self.change(|g| {
            let r = g.res.entry(collection.into()).or_default();
            r.missing = missing;
            r.generation += 1;
        });
    }

    /// Makes a collection answer 403 or serve again.
    pub fn set_forbidden(&self, collection: &str, forbidden: bool) {
        self.change(|g| {
            let r = g.res.entry(collection.into()).or_default();
            r.forbidden = forbidden;
            r.generation += 1;
        });
    }

    /// An object outside the watched collections (a Lease, an Event) by path.
    pub fn other(&self, path: &str) -> Option<Value> {
        self.inner.lock().unwrap().other.get(path).cloned()
    }

    /// Changes such an object in place (another agent's doing).
    pub fn edit_other(&self, path: &str, f: impl FnOnce(&mut Value)) {
        self.change(|g| {
            if let Some(o) = g.other.get_mut(path) {
                f(o);
            }
        });
    }

    pub fn lists(&self, collection: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .res
            .get(collection)
            .map_or(0, |r| r.lists)
    }

    pub fn watches(&self, collection: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .res
            .get(collection)
            .map_or(0, |r| r.watches)
    }

    pub fn item(&self, collection: &str, key: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .res
            .get(collection)?
            .items
            .get(key)
            .cloned()
    }

    /// Waits until `cond` holds on the server's state, or panics after `secs`.
    pub async fn wait_for(&self, what: &str, secs: u64, cond: impl Fn(&Inner) -> bool) {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if cond(&self.inner.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("timed out waiting for {what}");
            }
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q = req.uri().query().map(str::to_string);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (collection, ns, name, sub) = split(&path);
    let is_watched = inner.lock().unwrap().res.contains_key(&collection);

    if is_watched {
        if inner.lock().unwrap().res[&collection].forbidden {
            return full(
                StatusCode::FORBIDDEN,
                &status(403, "Forbidden", "the agent may not list this"),
            );
        }
        if inner.lock().unwrap().res[&collection].missing {
            return full(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        if method == Method::GET && name.is_none() {
            if query(q.as_deref(), "watch").as_deref() == Some("true") {
                let from: u64 = query(q.as_deref(), "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return watch_stream(inner, changed, collection, from);
            }
            let mut g = inner.lock().unwrap();
            let rv = g.rv;
            let r = g.res.get_mut(&collection).unwrap();
            r.lists += 1;
            let items: Vec<Value> = r.items.values().cloned().collect();
            return full(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            );
        }
        if method == Method::PATCH && sub.as_deref() == Some("status") {
            let k = format!(
                "{}/{}",
                ns.clone().unwrap_or_default(),
                name.clone().unwrap_or_default()
            );
            let mut out = None;
            {
                let mut g = inner.lock().unwrap();
                g.rv += 1;
                let rv = g.rv;
                let r = g.res.get_mut(&collection).unwrap();
                if let Some(o) = r.items.get_mut(&k) {
                    o["status"] = body["status"].clone();
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    let o = o.clone();
                    r.log.push((rv, "MODIFIED", o.clone()));
                    out = Some(o);
                }
                changed.send_replace(rv);
            }
            return match out {
                Some(o) => full(StatusCode::OK, &o),
                None => full(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "no such object"),
                ),
            };
        }
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "not in the fake"),
        );
    }

    // everything else (Leases, Events): a plain object store keyed by path
    let mut g = inner.lock().unwrap();
    let resp = match method {
        Method::GET => match g.other.get(&path) {
            Some(o) => full(StatusCode::OK, o),
            None => full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found")),
        },
        Method::POST => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or("generated")
                .to_string();
            let p = format!("{path}/{name}");
            if g.other.contains_key(&p) {
                full(
                    StatusCode::CONFLICT,
                    &status(409, "AlreadyExists", "exists"),
                )
            } else {
                g.rv += 1;
                let mut o = body;
                o["metadata"]["resourceVersion"] = json!(g.rv.to_string());
                g.other.insert(p, o.clone());
                full(StatusCode::CREATED, &o)
            }
        }
        Method::PUT => {
            let current = g
                .other
                .get(&path)
                .map(|o| o["metadata"]["resourceVersion"].clone());
            if current.is_some() && current.as_ref() != Some(&body["metadata"]["resourceVersion"]) {
                full(
                    StatusCode::CONFLICT,
                    &status(409, "Conflict", "the object has been modified"),
                )
            } else {
                g.rv += 1;
                let mut o = body;
                o["metadata"]["resourceVersion"] = json!(g.rv.to_string());
                g.other.insert(path.clone(), o.clone());
                full(StatusCode::OK, &o)
            }
        }
        _ => full(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "not in the fake"),
        ),
    };
    let rv = g.rv;
    drop(g);
    changed.send_replace(rv);
    resp
}

/// A chunked watch response: events after `from`, then new ones as they happen, until
/// the collection's generation changes (a dropped stream).
fn watch_stream(
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    collection: String,
    from: u64,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut notify = changed.subscribe();
    tokio::spawn(async move {
        let (generation, gone) = {
            let mut g = inner.lock().unwrap();
            let r = g.res.get_mut(&collection).unwrap();
            r.watches += 1;
            r.last_from = from;
            (r.generation, from < r.gone_before)
        };
        if gone {
            let line = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = tx.send(Bytes::from(format!("{line}\n"))).await;
            return;
        }
        let mut sent = from;
        loop {
            let lines: Option<Vec<(u64, String)>> = {
                let g = inner.lock().unwrap();
                let r = &g.res[&collection];
                (r.generation == generation && !r.missing && !r.forbidden).then(|| {
                    r.log
                        .iter()
                        .filter(|(rv, _, _)| *rv > sent)
                        .map(|(rv, ty, o)| (*rv, json!({"type": ty, "object": o}).to_string()))
                        .collect()
                })
            };
            let Some(lines) = lines else { return };
            for (rv, line) in lines {
                if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                    return;
                }
                sent = rv;
                let mut g = inner.lock().unwrap();
                if let Some(r) = g.res.get_mut(&collection) {
                    r.queued = r.queued.max(rv);
                }
                drop(g);
                changed.send_modify(|_| {});
            }
            if notify.changed().await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
