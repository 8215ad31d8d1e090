//! TLS rules in the model: serverNames (SNI) checks with Cilium's merge of the allows of
//! one peer and port, splice or interception, HTTP rules on decrypted requests, the
//! material of TLS contexts (fail closed per rule), plaintext on TLS ports, header
//! matches with secrets, validation, and the shared conformance cases of `cases-tls/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{accept, ccnp, cnp, dedent, reject};
use policy_model::conformance::{parse_case, Case, Expect};
use policy_model::tls::{TlsRole, TlsSession};
use policy_model::verdict::Verdict;
use policy_model::Model;

/// A cilium case with two pods in `t` (client, server), two externals and `secrets`.
fn case(policies: &str, secrets: &str, probes: &str) -> Case {
    let text = format!(
        "format: netpol-oracle/v1\nid: '1'\nname: x\nsemantics: cilium\ncluster:\n  namespaces: [{{name: t}}]\n  nodes: [{{name: n1, ip: 172.18.0.2}}]\n  pods:\n  - {{namespace: t, name: client, labels: {{app: client}}, ip: 10.0.0.1, node: n1}}\n  - {{namespace: t, name: server, labels: {{app: server}}, ip: 10.0.0.2, node: n1}}\n  externals:\n  - {{name: saas, ip: 203.0.113.20}}\n  - {{name: other, ip: 198.51.100.7}}\n  secrets:\n{}\npolicies:\n{}\nprobes:\n{}",
        indent(secrets, 4),
        indent(policies, 0),
        indent(probes, 2)
    );
    parse_case(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    dedent(s).lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// Runs every probe; returns the verdicts after checking each against its `expect`.
fn run(c: &Case) -> Vec<Verdict> {
    let model = c.compile(None, None).unwrap();
    c.probes
        .iter()
        .map(|p| {
            let v = p.verdict(&model).unwrap();
            assert_eq!(
                v.allowed,
                p.expect == Expect::Allow,
                "{}: {}",
                p.describe(),
                v
            );
            v
        })
        .collect()
}

fn reason(v: &Verdict) -> String {
    v.sides
        .iter()
        .map(|s| s.reason.clone())
        .collect::<Vec<_>>()
        .join(" | ")
}

const EGRESS_SNI: &str = "
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: sni, namespace: t}
  spec:
    endpointSelector: {matchLabels: {app: client}}
    egress:
    - toCIDR: [203.0.113.0/24]
      toPorts:
      - ports: [{port: '443', protocol: TCP}]
        serverNames: [api.saas.example, '*.cdn.example']
";

#[test]
fn sni_checks_splice_and_reset_with_the_rule_named() {
    let c = case(
        EGRESS_SNI,
        "[]",
        "
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: API.SaaS.example}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: img.cdn.example}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: a.img.cdn.example}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example.}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, http: {method: GET, path: /}, expect: deny}
        - {from: t/client, to: external:other, port: 443, tls: {sni: api.saas.example}, expect: deny}
        ",
    );
    let v = run(&c);
    assert!(
        reason(&v[0]).contains("spliced to the server untouched"),
        "{}",
        v[0]
    );
    assert_eq!(
        v[0].sides[0].rule.as_deref(),
        Some("spec.egress[0].toPorts[0]")
    );
    assert!(
        reason(&v[3]).contains(
            "SNI a.img.cdn.example matches no serverNames of CiliumNetworkPolicy t/sni spec.egress[0].toPorts[0]: reset"
        ),
        "{}",
        v[3]
    );
    // one trailing dot is the same DNS name: rustls drops it, and so does the model
    assert!(
        reason(&v[4]).contains("spliced to the server untouched"),
        "{}",
        v[4]
    );
    assert!(reason(&v[5]).contains("no SNI"), "{}", v[5]);
    assert!(reason(&v[6]).contains("not TLS"), "{}", v[6]);
    assert_eq!(v[7].layer.map(|l| l.to_string()).as_deref(), Some("L3"));
}

/// Cilium's agent merges the allows of one peer and port: an L4-only allow of the same
/// peer does not lift the SNI check of a serverNames rule, and the names of two rules
/// are unioned.
#[test]
fn allows_of_one_peer_and_port_are_merged() {
    let policies = "
    - apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: sni, namespace: t}
      specs:
      - endpointSelector: {matchLabels: {app: client}}
        egress:
        - toCIDR: [203.0.113.0/24]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
            serverNames: [api.saas.example]
      - endpointSelector: {matchLabels: {app: client}}
        egress:
        - toEntities: [world]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
        - toCIDR: [203.0.113.0/24]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
            serverNames: [files.saas.example]
    ";
    let c = case(
        policies,
        "[]",
        "
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: files.saas.example}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: www.saas.example}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, tls: {}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, http: {method: GET, path: /}, expect: deny}
        - {from: t/client, to: external:other, port: 443, tls: {sni: www.saas.example}, expect: allow}
        - {from: t/client, to: external:other, port: 443, http: {method: GET, path: /}, expect: allow}
        ",
    );
    let v = run(&c);
    // outside the serverNames rules' peers the L4 allow stands alone: not even proxied
    assert!(!v[5].sides[0].proxied, "{}", v[5]);
}

const INTERCEPT: &str = "
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: intercept, namespace: t}
  spec:
    endpointSelector: {matchLabels: {app: client}}
    egress:
    - toCIDR: [203.0.113.20/32]
      toPorts:
      - ports: [{port: '443', protocol: TCP}]
        serverNames: [api.saas.example]
        terminatingTLS: {secret: {name: intercept-ca}}
        originatingTLS: {secret: {name: public-ca}}
        rules:
          http:
          - {method: GET, path: /v1/.*}
    - toCIDR: [198.51.100.7/32]
      toPorts:
      - ports: [{port: '443', protocol: TCP}]
        terminatingTLS: {secret: {name: broken, namespace: other}, certificate: cert.pem}
        originatingTLS: {secret: {name: public-ca}}
";

#[test]
fn interception_checks_decrypted_requests_and_fails_closed_per_rule() {
    let c = case(
        INTERCEPT,
        "
        - {namespace: t, name: intercept-ca, keys: [tls.crt, tls.key]}
        - {namespace: t, name: public-ca, keys: [ca.crt]}
        - {namespace: other, name: broken, keys: [tls.crt, tls.key]}
        ",
        "
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, http: {method: GET, path: /v1/x}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, http: {method: DELETE, path: /v1/x}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, tls: {sni: www.saas.example}, http: {method: GET, path: /v1/x}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, http: {method: GET, path: /v1/x}, expect: deny}
        - {from: t/client, to: external:other, port: 443, tls: {sni: any.example}, expect: deny}
        ",
    );
    let v = run(&c);
    assert!(reason(&v[0]).contains("intercepted by CiliumNetworkPolicy t/intercept spec.egress[0].toPorts[0] (t/intercept-ca)"), "{}", v[0]);
    assert!(
        reason(&v[0]).contains("HTTPS: HTTP GET /v1/x matches"),
        "{}",
        v[0]
    );
    assert_eq!(
        v[0].sides[0].rule.as_deref(),
        Some("spec.egress[0].toPorts[0].rules.http[0]")
    );
    assert!(reason(&v[1]).contains("403 Access denied"), "{}", v[1]);
    // the other rule names a certificate key its secret lacks: fail closed, for it only
    assert!(
        reason(&v[5]).contains("secret other/broken has no cert.pem (certificate)"),
        "{}",
        v[5]
    );
    assert!(reason(&v[5]).contains("fail closed"), "{}", v[5]);
}

#[test]
fn the_session_decision_carries_the_contexts_the_proxy_needs() {
    let c = case(INTERCEPT, "[]", "[]");
    let m: Model = c.compile(None, None).unwrap();
    let conn = m.connection_policy(
        "10.0.0.1".parse().unwrap(),
        "203.0.113.20".parse().unwrap(),
        policy_model::Protocol::Tcp,
        443,
        Some("n1"),
    );
    let TlsSession::Intercept(i) = m.tls_session(&conn, Some("api.saas.example")) else {
        panic!("not intercepted")
    };
    assert_eq!(i.terminating.role, TlsRole::Terminating);
    // the secret's namespace defaults to the policy's
    assert_eq!(i.terminating.secret.to_string(), "t/intercept-ca");
    assert_eq!(i.terminating.cert_key(), "tls.crt");
    assert_eq!(i.terminating.private_key_key(), "tls.key");
    let o = i.originating.as_ref().unwrap();
    assert_eq!(
        (o.secret.to_string().as_str(), o.ca_key()),
        ("t/public-ca", "ca.crt")
    );
    assert_eq!(i.rule.rule, "spec.egress[0].toPorts[0]");
    // the datapath sends the port to the proxy like any L7 port
    assert!(m.l7.iter().any(|s| s.tls.is_some()));
    let TlsSession::Reset { reason, rule } = m.tls_session(&conn, Some("www.saas.example")) else {
        panic!("not reset")
    };
    assert!(reason.contains("www.saas.example"), "{reason}");
    assert_eq!(rule.unwrap().rule, "spec.egress[0].toPorts[0]");
}

#[test]
fn http_rules_without_termination_refuse_tls_and_filter_plaintext() {
    let policies = "
    - apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: http, namespace: t}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        egress:
        - toCIDR: [203.0.113.0/24]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
            rules: {http: [{method: GET}]}
    ";
    let c = case(
        policies,
        "[]",
        "
        - {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, http: {method: GET, path: /}, expect: deny}
        - {from: t/client, to: external:saas, port: 443, http: {method: GET, path: /}, expect: allow}
        - {from: t/client, to: external:saas, port: 443, http: {method: POST, path: /}, expect: deny}
        ",
    );
    let v = run(&c);
    assert!(reason(&v[0]).contains("cannot see inside TLS"), "{}", v[0]);
}

#[test]
fn terminating_without_originating_has_no_ca_in_the_model() {
    let policies = "
    - apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: term, namespace: t}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        egress:
        - toCIDR: [203.0.113.0/24]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
            terminatingTLS: {secret: {name: ca}}
    ";
    let c = case(
        policies,
        "- {namespace: t, name: ca, keys: [tls.crt, tls.key]}",
        "- {from: t/client, to: external:saas, port: 443, tls: {sni: api.saas.example}, expect: deny}",
    );
    let v = run(&c);
    assert!(reason(&v[0]).contains("tls_system_roots"), "{}", v[0]);
}

#[test]
fn header_matches_read_secrets() {
    let policies = "
    - apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: tok, namespace: t}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        egress:
        - toEndpoints: [{matchLabels: {app: server}}]
          toPorts:
          - ports: [{port: '80', protocol: TCP}]
            rules:
              http:
              - path: /a
                headerMatches: [{name: X-Token, secret: {name: token}}]
              - path: /b
                headerMatches: [{name: X-Token, value: inline, secret: {name: gone}}]
    ";
    let c = case(
        policies,
        "- {namespace: t, name: token, keys: [value], value: s3cr3t}",
        "
        - {from: t/client, to: t/server, port: 80, http: {path: /a, headers: {X-Token: s3cr3t}}, expect: allow}
        - {from: t/client, to: t/server, port: 80, http: {path: /a, headers: {X-Token: token}}, expect: deny}
        - {from: t/client, to: t/server, port: 80, http: {path: /b, headers: {X-Token: inline}}, expect: allow}
        ",
    );
    run(&c);
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn egress_port(extra: &str) -> String {
    cnp(&format!(
        "
        endpointSelector: {{}}
        egress:
        - toPorts:
          - ports: [{{port: '443', protocol: TCP}}]
{}",
        extra
            .lines()
            .map(|l| format!("            {}\n", l.trim()))
            .collect::<String>()
    ))
}

#[test]
fn server_name_patterns_are_checked_with_their_path() {
    for (name, why) in [
        ("'api.example.'", "trailing dot"),
        ("'a..example'", "empty label"),
        ("'a**.example'", "stands alone"),
        ("'a b.example'", "not allowed"),
    ] {
        reject(
            &egress_port(&format!("serverNames: [ok.example, {name}]")),
            "spec.egress[0].toPorts[0].serverNames[1]",
            why,
        );
    }
    accept(&egress_port(
        "serverNames: ['*.example', '**.x.example', 'a*b.example', '*']",
    ));
}

#[test]
fn tls_contexts_are_checked() {
    reject(
        &egress_port("originatingTLS: {secret: {name: ca}}"),
        "spec.egress[0].toPorts[0].originatingTLS",
        "originatingTLS needs terminatingTLS",
    );
    reject(
        &egress_port("terminatingTLS: {secret: {name: ../../etc}}"),
        "spec.egress[0].toPorts[0].terminatingTLS.secret.name",
        "is not a secret name",
    );
    reject(
        &egress_port("terminatingTLS: {secret: {name: x, namespace: A_B}}"),
        "spec.egress[0].toPorts[0].terminatingTLS.secret.namespace",
        "is not a namespace name",
    );
    reject(
        &egress_port("terminatingTLS: {secret: {name: x}, privateKey: ../key}"),
        "spec.egress[0].toPorts[0].terminatingTLS.privateKey",
        "is not a key of a secret",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '443', protocol: UDP}]
                serverNames: [a.example]
            "),
        "spec.egress[0].toPorts[0].ports",
        "apply to TCP only",
    );
    reject(
        &ccnp(
            "
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '443', protocol: TCP}]
                terminatingTLS: {secret: {name: x}}
            ",
        ),
        "spec.egress[0].toPorts[0].terminatingTLS.secret.namespace",
        "needs a namespace",
    );
    accept(&egress_port(
        "terminatingTLS: {secret: {name: x}, certificate: c.pem, privateKey: k.pem}\noriginatingTLS: {secret: {name: y, namespace: other}, trustedCA: bundle.crt}",
    ));
}

// ---------------------------------------------------------------------------------------
// The shared conformance cases
// ---------------------------------------------------------------------------------------

/// Every case of the repository's `conformance/cases-tls/` passes in the model.
#[test]
fn shared_tls_cases_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/cases-tls");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "{files:?}");
    let mut failed = Vec::new();
    let mut probes = 0;
    for f in &files {
        let c = parse_case(&std::fs::read_to_string(f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for r in c.run(None, None).unwrap() {
            probes += 1;
            if !r.passed {
                failed.push(format!(
                    "{}: {}: {}",
                    f.display(),
                    r.probe.describe(),
                    r.verdict.map(|v| v.to_string()).unwrap_or_default()
                ));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {probes} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
