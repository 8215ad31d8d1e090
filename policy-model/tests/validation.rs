//! Validation: every invalid input is rejected with the file, the object, the field path
//! and a reason, while valid objects next to it still load (reference section 1.6 and the
//! Kubernetes API validation).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{accept, anp, banp, ccnp, cnp, cnp2, np, reject, FILE, SIBLING};
use policy_model::api::load;

// ---------------------------------------------------------------------------------------
// CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy: structure
// ---------------------------------------------------------------------------------------

#[test]
fn cnp_needs_spec_or_specs() {
    let bad = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad, namespace: default}\n";
    reject(bad, "spec", "needs spec or specs");
    let two = accept(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ok, namespace: default}
specs:
- endpointSelector: {}
  ingress: [{}]
- endpointSelector: {}
  egress: [{}]
",
    );
    assert_eq!(two.len(), 2, "each of specs is a policy");
}

#[test]
fn rule_needs_at_least_one_direction() {
    reject(
        &cnp("endpointSelector: {}"),
        "spec",
        "at least one of ingress, ingressDeny, egress, egressDeny",
    );
    reject(
        &cnp("
            endpointSelector: {}
            labels: [{key: a}]
            "),
        "spec",
        "at least one of",
    );
    for dir in ["ingress", "ingressDeny", "egress", "egressDeny"] {
        accept(&cnp(&format!("endpointSelector: {{}}\n{dir}: [{{}}]")));
    }
}

#[test]
fn a_specs_entry_error_names_its_index() {
    let bad = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad, namespace: default}
specs:
- endpointSelector: {}
  ingress: [{}]
- endpointSelector: {}
";
    reject(bad, "specs[1]", "at least one of");
}

#[test]
fn endpoint_selector_xor_node_selector() {
    reject(
        &ccnp(
            "
            endpointSelector: {}
            nodeSelector: {}
            ingress: [{}]
            ",
        ),
        "spec",
        "mutually exclusive",
    );
    reject(
        &ccnp("ingress: [{}]"),
        "spec",
        "one of endpointSelector or nodeSelector is required",
    );
    accept(&ccnp("nodeSelector: {}\ningress: [{}]"));
    accept(&ccnp("endpointSelector: {}\ningress: [{}]"));
}

#[test]
fn node_selector_in_a_namespaced_cnp_is_rejected() {
    reject(
        &cnp("nodeSelector: {}\ningress: [{}]"),
        "spec.nodeSelector",
        "rule cannot have nodeSelector",
    );
}

#[test]
fn ccnp_with_a_namespace_is_rejected() {
    let bad = "apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: bad, namespace: default}
spec:
  endpointSelector: {}
  ingress: [{}]
";
    reject(bad, "metadata.namespace", "not namespaced");
}

// ---------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------

#[test]
fn one_l3_peer_type_per_rule() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - fromEndpoints: [{}]
              fromCIDR: [10.0.0.0/8]
            "),
        "spec.ingress[0]",
        "combining fromEndpoints and fromCIDR",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toEndpoints: [{}]
            - toFQDNs: [{matchName: example.com}]
              toEndpoints: [{}]
            "),
        "spec.egress[1]",
        "combining toEndpoints and toFQDNs",
    );
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - fromCIDR: [10.0.0.0/8]
              fromCIDRSet: [{cidr: 192.168.0.0/16}]
            "),
        "spec.ingress[0]",
        "combining fromCIDR and fromCIDRSet",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egressDeny:
            - toEntities: [world]
              toCIDR: [10.0.0.0/8]
            "),
        "spec.egressDeny[0]",
        "combining toCIDR and toEntities",
    );
    // the same peers in separate rules are fine
    accept(&cnp("
        endpointSelector: {}
        ingress:
        - fromEndpoints: [{}]
        - fromCIDR: [10.0.0.0/8]
        - fromCIDRSet: [{cidr: 192.168.0.0/16}]
        egress:
        - toEndpoints: [{}]
        - toFQDNs: [{matchName: example.com}]
        "));
}

#[test]
fn unknown_entity_is_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - fromEntities: [cluster, wrold]
            "),
        "spec.ingress[0].fromEntities[1]",
        "unknown entity \"wrold\"",
    );
    // the internal world-ipv4 is not in the CRD enum
    reject(
        &cnp("endpointSelector: {}\negress: [{toEntities: [world-ipv4]}]"),
        "spec.egress[0].toEntities[0]",
        "unknown entity",
    );
    accept(&cnp(
        "
        endpointSelector: {}
        egress:
        - toEntities: [all, world, cluster, host, init, ingress, unmanaged, remote-node, health, none, kube-apiserver]
        ",
    ));
}

#[test]
fn cidr_except_must_be_inside_and_longer() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - fromCIDRSet:
              - cidr: 10.0.0.0/16
                except: [10.0.1.0/24, 10.1.0.0/24]
            "),
        "spec.ingress[0].fromCIDRSet[0].except[1]",
        "not inside 10.0.0.0/16",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toCIDRSet:
              - cidr: 10.0.0.0/16
                except: [10.0.0.0/16]
            "),
        "spec.egress[0].toCIDRSet[0].except[0]",
        "with a longer prefix",
    );
    accept(&cnp("
        endpointSelector: {}
        egress:
        - toCIDRSet:
          - cidr: 10.0.0.0/16
            except: [10.0.1.0/24, 10.0.2.7/32]
        "));
}

#[test]
fn invalid_cidrs_are_rejected() {
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromCIDR: [10.0.0.0/33]}]"),
        "spec.ingress[0].fromCIDR[0]",
        "is not a CIDR",
    );
    reject(
        &cnp("endpointSelector: {}\negress: [{toCIDR: [10.0.0.0/8, not-an-ip]}]"),
        "spec.egress[0].toCIDR[1]",
        "is not a CIDR",
    );
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromCIDRSet: [{cidr: 10.0.0.1/8}]}]"),
        "spec.ingress[0].fromCIDRSet[0].cidr",
        "host bits set",
    );
    reject(
        &np("
            podSelector: {}
            ingress:
            - from:
              - ipBlock: {cidr: 192.168.1.1/24}
            "),
        "spec.ingress[0].from[0].ipBlock.cidr",
        "host bits set",
    );
    reject(
        &np("
            podSelector: {}
            egress:
            - to:
              - ipBlock: {cidr: 192.168.0.0/16, except: [10.0.0.0/24]}
            "),
        "spec.egress[0].to[0].ipBlock.except[0]",
        "not inside",
    );
    // a bare address is a host prefix, as Cilium allows
    accept(&cnp(
        "endpointSelector: {}\negress: [{toCIDR: [192.0.2.1, '2001:db8::/32']}]",
    ));
}

#[test]
fn cidr_set_needs_exactly_one_source_and_groups_are_unsupported() {
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromCIDRSet: [{except: [10.0.0.0/24]}]}]"),
        "spec.ingress[0].fromCIDRSet[0]",
        "exactly one of cidr, cidrGroupRef, cidrGroupSelector",
    );
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromCIDRSet: [{cidr: 10.0.0.0/8, cidrGroupRef: grp}]}]"),
        "spec.ingress[0].fromCIDRSet[0]",
        "exactly one of",
    );
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromCIDRSet: [{cidrGroupRef: my-group}]}]"),
        "spec.ingress[0].fromCIDRSet[0]",
        "CiliumCIDRGroup references are not supported",
    );
}

#[test]
fn unsupported_peer_types_are_rejected_with_clear_reasons() {
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toServices:
              - k8sService: {serviceName: web, namespace: default}
            "),
        "spec.egress[0].toServices",
        "Services are not modelled",
    );
    reject(
        &cnp("endpointSelector: {}\negress: [{toGroups: [{aws: {securityGroupsIds: [sg-1]}}]}]"),
        "spec.egress[0].toGroups",
        "cloud provider groups are not supported",
    );
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromGroups: [{aws: {securityGroupsIds: [sg-1]}}]}]"),
        "spec.ingress[0].fromGroups",
        "cloud provider groups are not supported",
    );
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromNodes: [{matchLabels: {role: x}}]}]"),
        "spec.ingress[0].fromNodes",
        "--enable-node-selector-labels",
    );
    reject(
        &cnp("endpointSelector: {}\negress: [{toNodes: [{}]}]"),
        "spec.egress[0].toNodes",
        "--enable-node-selector-labels",
    );
}

#[test]
fn removed_requires_fields_are_rejected() {
    reject(
        &cnp(
            "endpointSelector: {}\ningress: [{fromEndpoints: [{}], fromRequires: [{matchLabels: {env: prod}}]}]",
        ),
        "spec.ingress[0].fromRequires",
        "fromRequires was removed",
    );
    reject(
        &cnp(
            "endpointSelector: {}\negress: [{toEndpoints: [{}], toRequires: [{matchLabels: {env: prod}}]}]",
        ),
        "spec.egress[0].toRequires",
        "toRequires was removed",
    );
}

#[test]
fn authentication_modes() {
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromEndpoints: [{}], authentication: {mode: required}}]"),
        "spec.ingress[0].authentication.mode",
        "mutual authentication (required) is not supported",
    );
    reject(
        &cnp("endpointSelector: {}\negress: [{toEndpoints: [{}], authentication: {mode: test-always-fail}}]"),
        "spec.egress[0].authentication.mode",
        "not supported",
    );
    reject(
        &cnp("endpointSelector: {}\ningress: [{fromEndpoints: [{}], authentication: {mode: sometimes}}]"),
        "spec.ingress[0].authentication.mode",
        "\"sometimes\" is not one of disabled, required, test-always-fail",
    );
    accept(&cnp(
        "endpointSelector: {}\ningress: [{fromEndpoints: [{}], authentication: {mode: disabled}}]",
    ));
}

#[test]
fn log_value_is_at_most_32_characters() {
    let long = "x".repeat(33);
    reject(
        &cnp(&format!(
            "endpointSelector: {{}}\ningress: [{{}}]\nlog: {{value: {long}}}"
        )),
        "spec.log.value",
        "at most 32",
    );
    let ok = "x".repeat(32);
    accept(&cnp(&format!(
        "endpointSelector: {{}}\ningress: [{{}}]\nlog: {{value: {ok}}}"
    )));
}

// ---------------------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------------------

#[test]
fn selector_operator_errors() {
    reject(
        &cnp("
            endpointSelector:
              matchExpressions: [{key: app, operator: Has, values: [a]}]
            ingress: [{}]
            "),
        "spec.endpointSelector.matchExpressions[0].operator",
        "unknown operator \"Has\"",
    );
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - fromEndpoints:
              - matchExpressions:
                - {key: app, operator: Exists}
                - {key: tier, operator: In}
            "),
        "spec.ingress[0].fromEndpoints[0].matchExpressions[1].values",
        "operator In needs at least one value",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toEndpoints:
              - matchExpressions: [{key: app, operator: NotIn, values: []}]
            "),
        "spec.egress[0].toEndpoints[0].matchExpressions[0].values",
        "needs at least one value",
    );
    reject(
        &np("
            podSelector:
              matchExpressions: [{key: app, operator: Exists, values: [a]}]
            "),
        "spec.podSelector.matchExpressions[0].values",
        "operator Exists takes no values",
    );
    reject(
        &np("
            podSelector: {}
            ingress:
            - from:
              - namespaceSelector:
                  matchExpressions: [{key: team, operator: DoesNotExist, values: [x]}]
            "),
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "takes no values",
    );
    reject(
        &anp("
            priority: 10
            subject:
              namespaces:
                matchExpressions: [{key: team, operator: in, values: [x]}]
            ingress:
            - action: Allow
              from: [{namespaces: {}}]
            "),
        "spec.subject.namespaces.matchExpressions[0].operator",
        "unknown operator",
    );
    accept(&cnp("
        endpointSelector:
          matchExpressions:
          - {key: a, operator: In, values: [x]}
          - {key: b, operator: NotIn, values: [y]}
          - {key: c, operator: Exists}
          - {key: d, operator: DoesNotExist}
        ingress: [{}]
        "));
}

// ---------------------------------------------------------------------------------------
// toPorts and ICMP
// ---------------------------------------------------------------------------------------

fn ports_list(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{port: '{}', protocol: TCP}}", 1000 + i))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn at_most_40_ports_per_to_ports_entry() {
    reject(
        &cnp(&format!(
            "endpointSelector: {{}}\ningress: [{{toPorts: [{{ports: [{}]}}]}}]",
            ports_list(41)
        )),
        "spec.ingress[0].toPorts[0].ports",
        "too many ports, the max is 40",
    );
    accept(&cnp(&format!(
        "endpointSelector: {{}}\ningress: [{{toPorts: [{{ports: [{}]}}]}}]",
        ports_list(40)
    )));
}

fn icmp_fields(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{type: {}}}", i % 256))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn at_most_40_icmp_fields() {
    reject(
        &cnp(&format!(
            "endpointSelector: {{}}\negress: [{{icmps: [{{fields: [{}]}}]}}]",
            icmp_fields(41)
        )),
        "spec.egress[0].icmps[0].fields",
        "too many ICMP fields, the max is 40",
    );
    accept(&cnp(&format!(
        "endpointSelector: {{}}\negress: [{{icmps: [{{fields: [{}]}}]}}]",
        icmp_fields(40)
    )));
}

#[test]
fn icmps_together_with_to_ports_is_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - fromEntities: [world]
              toPorts: [{ports: [{port: '80', protocol: TCP}]}]
              icmps: [{fields: [{type: 8, family: IPv4}]}]
            "),
        "spec.ingress[0].icmps",
        "may only be present without toPorts",
    );
    accept(&cnp("
        endpointSelector: {}
        ingress:
        - fromEntities: [world]
          icmps: [{fields: [{type: EchoRequest}, {type: 128, family: IPv6}]}]
        - fromEntities: [world]
          toPorts: [{ports: [{port: '80', protocol: TCP}]}]
        "));
}

#[test]
fn icmp_type_and_family_errors() {
    reject(
        &cnp("endpointSelector: {}\negress: [{icmps: [{fields: [{type: 256}]}]}]"),
        "spec.egress[0].icmps[0].fields[0].type",
        "out of range 0-255",
    );
    reject(
        &cnp("endpointSelector: {}\negress: [{icmps: [{fields: [{type: Ping}]}]}]"),
        "spec.egress[0].icmps[0].fields[0].type",
        "unknown ICMP type name",
    );
    reject(
        &cnp("endpointSelector: {}\negress: [{icmps: [{fields: [{type: 8, family: IPv5}]}]}]"),
        "spec.egress[0].icmps[0].fields[0].family",
        "not IPv4 or IPv6",
    );
}

#[test]
fn invalid_ports_are_rejected() {
    let with_port = |p: &str| {
        cnp(&format!(
            "endpointSelector: {{}}\ningress: [{{toPorts: [{{ports: [{{port: '80'}}, {p}]}}]}}]"
        ))
    };
    reject(
        &with_port("{port: '65536'}"),
        "spec.ingress[0].toPorts[0].ports[1].port",
        "out of range 0-65535",
    );
    reject(
        &with_port("{port: -1}"),
        "spec.ingress[0].toPorts[0].ports[1].port",
        "out of range",
    );
    reject(
        &with_port("{port: 'http--alt'}"),
        "spec.ingress[0].toPorts[0].ports[1].port",
        "neither a port number nor a valid port name",
    );
    reject(
        &with_port("{port: 'my_port'}"),
        "spec.ingress[0].toPorts[0].ports[1].port",
        "neither a port number nor a valid port name",
    );
    reject(
        &with_port("{port: 'averyverylongportname'}"),
        "spec.ingress[0].toPorts[0].ports[1].port",
        "neither a port number nor a valid port name",
    );
    reject(
        &with_port("{port: '8080', endPort: 8000}"),
        "spec.ingress[0].toPorts[0].ports[1].endPort",
        "endPort 8000 is below port 8080",
    );
    reject(
        &with_port("{port: '8080', endPort: 70000}"),
        "spec.ingress[0].toPorts[0].ports[1].endPort",
        "out of range",
    );
    accept(&with_port("{port: 'HTTP-alt', protocol: TCP}"));
    accept(&with_port("{port: '8000', endPort: 8080, protocol: UDP}"));
}

#[test]
fn unknown_protocol_is_rejected() {
    let with_proto = |p: &str| {
        cnp(&format!(
            "endpointSelector: {{}}\negress: [{{toPorts: [{{ports: [{{port: '80', protocol: {p}}}]}}]}}]"
        ))
    };
    reject(
        &with_proto("TPC"),
        "spec.egress[0].toPorts[0].ports[0].protocol",
        "\"TPC\" is not one of TCP, UDP, SCTP, ANY",
    );
    reject(
        &with_proto("ICMP"),
        "spec.egress[0].toPorts[0].ports[0].protocol",
        "use icmps",
    );
    reject(
        &with_proto("tcp"),
        "spec.egress[0].toPorts[0].ports[0].protocol",
        "is not one of",
    );
    for p in ["TCP", "UDP", "SCTP", "ANY"] {
        accept(&with_proto(p));
    }
}

#[test]
fn unknown_field_is_rejected_with_its_path() {
    let e = reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toEndpoints: [{}]
              toPort: [{ports: [{port: '80'}]}]
            "),
        "spec.egress[0].toPort",
        "unknown field `toPort`",
    );
    assert!(
        e.reason.contains("toPorts"),
        "suggests the known fields: {e}"
    );
    reject(
        &np("
            podSelector: {}
            ingress:
            - from: [{podSelector: {}}]
              port: [{port: 80}]
            "),
        "spec.ingress[0].port",
        "unknown field `port`",
    );
    reject(
        &cnp("
            endpointSelector:
              matchLabel: {app: a}
            ingress: [{}]
            "),
        "spec.endpointSelector.matchLabel",
        "unknown field `matchLabel`",
    );
}

// ---------------------------------------------------------------------------------------
// L7 rules
// ---------------------------------------------------------------------------------------

#[test]
fn dns_rules_on_ingress_are_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: '53', protocol: UDP}]
                rules: {dns: [{matchPattern: '*'}]}
            "),
        "spec.ingress[0].toPorts[0].rules.dns",
        "DNS rules are not allowed on ingress",
    );
}

#[test]
fn http_rules_require_protocol_tcp() {
    let with = |proto: &str| {
        cnp(&format!(
            "
            endpointSelector: {{}}
            ingress:
            - toPorts:
              - ports: [{{port: '80'{proto}}}]
                rules: {{http: [{{method: GET}}]}}
            "
        ))
    };
    // an omitted protocol is ANY, which is rejected for HTTP
    reject(
        &with(""),
        "spec.ingress[0].toPorts[0].rules.http",
        "L7 rules can only apply to TCP (not ANY)",
    );
    reject(
        &with(", protocol: ANY"),
        "spec.ingress[0].toPorts[0].rules.http",
        "only apply to TCP",
    );
    reject(
        &with(", protocol: UDP"),
        "spec.ingress[0].toPorts[0].rules.http",
        "only apply to TCP",
    );
    accept(&with(", protocol: TCP"));
    // HTTP rules may use a port range
    accept(&with(", endPort: 8080, protocol: TCP"));
}

#[test]
fn l7_rules_with_port_0_are_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: '0', protocol: TCP}]
                rules: {http: [{}]}
            "),
        "spec.ingress[0].toPorts[0].rules.http",
        "L7 rules can not be used when a port is 0",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '0', protocol: UDP}]
                rules: {dns: [{matchPattern: '*'}]}
            "),
        "spec.egress[0].toPorts[0].rules.dns",
        "port is 0",
    );
}

#[test]
fn dns_rules_need_ports_and_no_range() {
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toEndpoints: [{}]
              toPorts:
              - rules: {dns: [{matchPattern: '*'}]}
            "),
        "spec.egress[0].toPorts[0].rules.dns",
        "port 53 must be specified for DNS rules",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toEndpoints: [{}]
              toPorts:
              - ports: [{port: '53', endPort: 54, protocol: UDP}]
                rules: {dns: [{matchPattern: '*'}]}
            "),
        "spec.egress[0].toPorts[0].rules.dns",
        "DNS rules do not support port ranges",
    );
    // any protocol (TCP, UDP, ANY) is fine for DNS
    accept(&cnp("
        endpointSelector: {}
        egress:
        - toEndpoints: [{}]
          toPorts:
          - ports: [{port: '53'}, {port: '53', protocol: TCP}, {port: '53', protocol: UDP}]
            rules: {dns: [{matchPattern: '*'}]}
        "));
}

#[test]
fn http_rules_in_host_policies_are_rejected() {
    reject(
        &ccnp(
            "
            nodeSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: '80', protocol: TCP}]
                rules: {http: [{path: /}]}
            ",
        ),
        "spec.ingress[0].toPorts[0].rules.http",
        "HTTP rules are not allowed in host policies",
    );
    reject(
        &ccnp(
            "
            nodeSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '80', protocol: TCP}]
                rules: {http: [{path: /}]}
            ",
        ),
        "spec.egress[0].toPorts[0].rules.http",
        "not allowed in host policies",
    );
    // the same rule selecting pods is fine
    accept(&ccnp(
        "
        endpointSelector: {}
        egress:
        - toPorts:
          - ports: [{port: '80', protocol: TCP}]
            rules: {http: [{path: /}]}
        ",
    ));
}

#[test]
fn several_l7_types_in_one_rules_block_are_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '53', protocol: TCP}]
                rules:
                  http: [{}]
                  dns: [{matchName: a.com}]
            "),
        "spec.egress[0].toPorts[0].rules",
        "multiple L7 protocol rule types specified in single rule",
    );
}

#[test]
fn kafka_and_l7proto_are_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: '9092', protocol: TCP}]
                rules: {kafka: [{topic: orders}]}
            "),
        "spec.ingress[0].toPorts[0].rules.kafka",
        "Kafka rules were removed in Cilium 1.20",
    );
    reject(
        &cnp("
            endpointSelector: {}
            ingress:
            - toPorts:
              - ports: [{port: '6379', protocol: TCP}]
                rules: {l7proto: r2d2, l7: [{cmd: READ}]}
            "),
        "spec.ingress[0].toPorts[0].rules.l7proto",
        "l7proto rules were removed",
    );
}

#[test]
fn server_names_with_l7_need_terminating_tls() {
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toFQDNs: [{matchName: example.com}]
              toPorts:
              - ports: [{port: '443', protocol: TCP}]
                serverNames: [example.com]
                rules: {http: [{}]}
            "),
        "spec.egress[0].toPorts[0].rules",
        "serverNames are not allowed with L7 rules without TLS termination",
    );
    // with TLS termination, or without L7 rules, it is fine
    accept(&cnp("
        endpointSelector: {}
        egress:
        - toFQDNs: [{matchName: example.com}]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
            serverNames: [example.com]
            terminatingTLS: {secret: {name: tls, namespace: default}}
            originatingTLS: {secret: {name: ca}}
            rules: {http: [{}]}
        - toFQDNs: [{matchName: example.org}]
          toPorts:
          - ports: [{port: '443', protocol: TCP}]
            serverNames: ['*.example.org']
        "));
}

#[test]
fn empty_server_name_is_rejected() {
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '443', protocol: TCP}]
                serverNames: [a.example.com, '']
            "),
        "spec.egress[0].toPorts[0].serverNames[1]",
        "empty server name",
    );
}

#[test]
fn tls_context_needs_a_secret_name() {
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '443', protocol: TCP}]
                terminatingTLS: {certificate: tls.crt}
            "),
        "spec.egress[0].toPorts[0].terminatingTLS.secret",
        "needs a secret with a name",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toPorts:
              - ports: [{port: '443', protocol: TCP}]
                originatingTLS: {secret: {namespace: default}}
            "),
        "spec.egress[0].toPorts[0].originatingTLS.secret",
        "needs a secret with a name",
    );
}

#[test]
fn invalid_http_regexes_are_rejected() {
    for (field, value) in [
        ("method", "GET|("),
        ("path", "/api/[a-"),
        ("host", "*.example.com"),
    ] {
        reject(
            &cnp(&format!(
                "
                endpointSelector: {{}}
                ingress:
                - toPorts:
                  - ports: [{{port: '80', protocol: TCP}}]
                    rules:
                      http:
                      - {{}}
                      - {{{field}: '{value}'}}
                "
            )),
            &format!("spec.ingress[0].toPorts[0].rules.http[1].{field}"),
            "invalid regex",
        );
    }
    accept(&cnp(r#"
        endpointSelector: {}
        ingress:
        - toPorts:
          - ports: [{port: '80', protocol: TCP}]
            rules:
              http:
              - {method: 'GET|HEAD', path: '/api/v[0-9]+/.*', host: '.*\.example\.com'}
        "#));
}

#[test]
fn header_match_errors() {
    let with = |hm: &str| {
        cnp(&format!(
            "
            endpointSelector: {{}}
            ingress:
            - toPorts:
              - ports: [{{port: '80', protocol: TCP}}]
                rules:
                  http:
                  - headerMatches: [{{name: X-Ok, value: '1'}}, {hm}]
            "
        ))
    };
    reject(
        &with("{value: x}"),
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[1].name",
        "a header match needs a name",
    );
    reject(
        &with("{name: X-Token, value: x, mismatch: IGNORE}"),
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[1].mismatch",
        "\"IGNORE\" is not one of LOG, ADD, DELETE, REPLACE",
    );
    reject(
        &with("{name: X-Token, secret: {namespace: default}}"),
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[1].secret.name",
        "a secret reference needs a name",
    );
    for m in ["LOG", "ADD", "DELETE", "REPLACE"] {
        accept(&with(&format!(
            "{{name: X-Token, value: x, mismatch: {m}}}"
        )));
    }
    accept(&with(
        "{name: X-Token, secret: {namespace: default, name: tok}}",
    ));
}

#[test]
fn deny_rules_cannot_carry_l7_or_fqdns() {
    reject(
        &cnp("
            endpointSelector: {}
            egressDeny:
            - toEndpoints: [{}]
              toPorts:
              - ports: [{port: '80', protocol: TCP}]
                rules: {http: [{method: GET}]}
            "),
        "spec.egressDeny[0].toPorts[0]",
        "deny rules may only carry ports",
    );
    reject(
        &cnp("
            endpointSelector: {}
            ingressDeny:
            - fromEndpoints: [{}]
              toPorts:
              - ports: [{port: '443', protocol: TCP}]
                serverNames: [example.com]
            "),
        "spec.ingressDeny[0].toPorts[0]",
        "deny rules may only carry ports",
    );
    reject(
        &cnp("
            endpointSelector: {}
            egressDeny:
            - toFQDNs: [{matchName: example.com}]
            "),
        "spec.egressDeny[0].toFQDNs",
        "deny rules cannot use toFQDNs",
    );
    accept(&cnp("
        endpointSelector: {}
        egressDeny:
        - toEndpoints: [{}]
          toPorts: [{ports: [{port: '80', protocol: TCP}]}]
        "));
}

// ---------------------------------------------------------------------------------------
// DNS names and patterns
// ---------------------------------------------------------------------------------------

fn fqdn(sel: &str) -> String {
    cnp(&format!(
        "endpointSelector: {{}}\negress: [{{toFQDNs: [{sel}]}}]"
    ))
}

#[test]
fn match_name_and_match_pattern_errors() {
    reject(
        &fqdn("{matchName: 'exa*mple.com'}"),
        "spec.egress[0].toFQDNs[0].matchName",
        "character '*' is not allowed",
    );
    reject(
        &fqdn("{matchName: 'exa mple.com'}"),
        "spec.egress[0].toFQDNs[0].matchName",
        "is not allowed",
    );
    reject(
        &fqdn("{matchPattern: '[a-z].example.com'}"),
        "spec.egress[0].toFQDNs[0].matchPattern",
        "character '[' is not allowed",
    );
    reject(
        &fqdn("{matchName: example.com, matchPattern: '*.example.com'}"),
        "spec.egress[0].toFQDNs[0]",
        "matchName and matchPattern are mutually exclusive",
    );
    reject(
        &fqdn("{}"),
        "spec.egress[0].toFQDNs[0]",
        "one of matchName or matchPattern is required",
    );
    let long = format!("{}.com", "a".repeat(252));
    reject(
        &fqdn(&format!("{{matchName: {long}}}")),
        "spec.egress[0].toFQDNs[0].matchName",
        "longer than 255",
    );
    reject(
        &fqdn(&format!("{{matchPattern: '*{long}'}}")),
        "spec.egress[0].toFQDNs[0].matchPattern",
        "longer than 255",
    );
    // the same checks apply to DNS rules
    reject(
        &cnp("
            endpointSelector: {}
            egress:
            - toEndpoints: [{}]
              toPorts:
              - ports: [{port: '53', protocol: UDP}]
                rules:
                  dns: [{matchPattern: '*.cilium.io'}, {matchName: 'bad/name'}]
            "),
        "spec.egress[0].toPorts[0].rules.dns[1].matchName",
        "is not allowed",
    );
    accept(&fqdn(&format!(
        "{{matchName: {}}}, {{matchPattern: '**.example.com'}}, {{matchName: My_Host-1.Example.COM.}}",
        "a".repeat(251) + ".com"
    )));
}

// ---------------------------------------------------------------------------------------
// NetworkPolicy
// ---------------------------------------------------------------------------------------

#[test]
fn np_policy_types_values() {
    reject(
        &np("
            podSelector: {}
            policyTypes: [Ingress, egress]
            "),
        "spec.policyTypes[1]",
        "\"egress\" is not Ingress or Egress",
    );
    accept(&np("
        podSelector: {}
        policyTypes: [Ingress, Egress]
        "));
}

#[test]
fn np_peer_with_ip_block_and_selectors_is_rejected() {
    reject(
        &np("
            podSelector: {}
            ingress:
            - from:
              - podSelector: {}
              - ipBlock: {cidr: 10.0.0.0/8}
                podSelector: {matchLabels: {app: a}}
            "),
        "spec.ingress[0].from[1]",
        "ipBlock cannot be combined with podSelector or namespaceSelector",
    );
    reject(
        &np("
            podSelector: {}
            egress:
            - to:
              - ipBlock: {cidr: 10.0.0.0/8}
                namespaceSelector: {}
            "),
        "spec.egress[0].to[0]",
        "ipBlock cannot be combined",
    );
}

#[test]
fn np_peer_with_nothing_is_rejected() {
    reject(
        &np("
            podSelector: {}
            ingress:
            - from: [{}]
            "),
        "spec.ingress[0].from[0]",
        "a peer needs podSelector, namespaceSelector or ipBlock",
    );
}

#[test]
fn np_port_errors() {
    reject(
        &np("
            podSelector: {}
            ingress:
            - ports: [{port: http, endPort: 90}]
            "),
        "spec.ingress[0].ports[0].endPort",
        "endPort may not be set with a named port",
    );
    reject(
        &np("
            podSelector: {}
            ingress:
            - ports: [{port: 0}]
            "),
        "spec.ingress[0].ports[0].port",
        "port must be between 1 and 65535",
    );
    reject(
        &np("
            podSelector: {}
            egress:
            - ports: [{port: 90, endPort: 80}]
            "),
        "spec.egress[0].ports[0].endPort",
        "must be a port at least 90",
    );
    reject(
        &np("
            podSelector: {}
            egress:
            - ports: [{endPort: 80}]
            "),
        "spec.egress[0].ports[0].endPort",
        "endPort needs a port",
    );
    reject(
        &np("
            podSelector: {}
            egress:
            - ports: [{port: 80, protocol: ICMP}]
            "),
        "spec.egress[0].ports[0].protocol",
        "is not one of TCP, UDP, SCTP",
    );
    accept(&np("
        podSelector: {}
        ingress:
        - ports: [{port: http}, {port: 80, endPort: 90, protocol: UDP}, {protocol: SCTP}]
        "));
}

#[test]
fn np_needs_a_namespace() {
    let bad = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad}
spec:
  podSelector: {}
";
    reject(bad, "metadata.namespace", "needs a namespace");
}

// ---------------------------------------------------------------------------------------
// AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy
// ---------------------------------------------------------------------------------------

const ANP_RULES: &str = "
subject: {namespaces: {}}
ingress:
- action: Allow
  from: [{namespaces: {}}]
";

#[test]
fn anp_priority_is_required_and_in_range() {
    reject(&anp(ANP_RULES), "spec.priority", "priority is required");
    reject(
        &anp(&format!("priority: 1001\n{}", common::dedent(ANP_RULES))),
        "spec.priority",
        "priority 1001 is out of range 0-1000",
    );
    reject(
        &anp(&format!("priority: -1\n{}", common::dedent(ANP_RULES))),
        "spec.priority",
        "out of range",
    );
    accept(&anp(&format!("priority: 0\n{}", common::dedent(ANP_RULES))));
    accept(&anp(&format!(
        "priority: 1000\n{}",
        common::dedent(ANP_RULES)
    )));
}

#[test]
fn anp_subject_is_exactly_one_of_namespaces_or_pods() {
    reject(
        &anp("
            priority: 1
            subject: {}
            "),
        "spec.subject",
        "exactly one of namespaces or pods is required",
    );
    reject(
        &anp("
            priority: 1
            subject:
              namespaces: {}
              pods: {namespaceSelector: {}, podSelector: {}}
            "),
        "spec.subject",
        "exactly one of namespaces or pods",
    );
    accept(&anp("
        priority: 1
        subject:
          pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}
        egress:
        - action: Deny
          to: [{networks: [0.0.0.0/0]}]
        "));
}

#[test]
fn actions_per_kind() {
    let rule = |action: &str| {
        format!(
            "
            subject: {{namespaces: {{}}}}
            ingress:
            - name: r
              action: {action}
              from: [{{namespaces: {{}}}}]
            "
        )
    };
    // ANP: Allow, Deny, Pass
    for a in ["Allow", "Deny", "Pass"] {
        accept(&anp(&format!("priority: 5\n{}", common::dedent(&rule(a)))));
    }
    reject(
        &anp(&format!("priority: 5\n{}", common::dedent(&rule("Accept")))),
        "spec.ingress[0].action",
        "\"Accept\" is not one of Allow, Deny, Pass",
    );
    // BANP: no Pass
    accept(&banp("default", &rule("Allow")));
    accept(&banp("default", &rule("Deny")));
    reject(
        &banp("default", &rule("Pass")),
        "spec.ingress[0].action",
        "\"Pass\" is not one of Allow, Deny",
    );
    // v1alpha2: Accept instead of Allow; Baseline has no Pass
    let admin = |a: &str| {
        cnp2(&format!(
            "tier: Admin\npriority: 5\n{}",
            common::dedent(&rule(a))
        ))
    };
    let baseline = |a: &str| {
        cnp2(&format!(
            "tier: Baseline\npriority: 5\n{}",
            common::dedent(&rule(a))
        ))
    };
    for a in ["Accept", "Deny", "Pass"] {
        accept(&admin(a));
    }
    reject(
        &admin("Allow"),
        "spec.ingress[0].action",
        "\"Allow\" is not one of Accept, Deny, Pass",
    );
    accept(&baseline("Accept"));
    reject(
        &baseline("Pass"),
        "spec.ingress[0].action",
        "\"Pass\" is not one of Accept, Deny",
    );
    reject(
        &cnp2(&format!("priority: 5\n{}", common::dedent(&rule("Accept")))),
        "spec.tier",
        "is not Admin or Baseline",
    );
}

#[test]
fn banp_must_be_named_default_and_has_no_priority() {
    let e = reject(
        &banp("bad-name", ANP_RULES),
        "metadata.name",
        "must be named \"default\"",
    );
    assert_eq!(
        e.object.as_deref(),
        Some("BaselineAdminNetworkPolicy bad-name")
    );
    reject(
        &banp(
            "default",
            &format!("priority: 3\n{}", common::dedent(ANP_RULES)),
        ),
        "spec.priority",
        "has no priority",
    );
}

#[test]
fn admin_peers_are_exactly_one_type() {
    reject(
        &anp("
            priority: 1
            subject: {namespaces: {}}
            egress:
            - action: Deny
              to:
              - namespaces: {}
                networks: [10.0.0.0/8]
            "),
        "spec.egress[0].to[0]",
        "exactly one of namespaces, pods, nodes, networks or domainNames",
    );
    reject(
        &anp("
            priority: 1
            subject: {namespaces: {}}
            egress:
            - action: Deny
              to: [{}]
            "),
        "spec.egress[0].to[0]",
        "exactly one of",
    );
    reject(
        &anp("
            priority: 1
            subject: {namespaces: {}}
            egress:
            - action: Deny
              to: []
            "),
        "spec.egress[0].to",
        "between 1 and 100 peers",
    );
}

#[test]
fn admin_ingress_may_not_use_nodes_or_networks() {
    reject(
        &anp("
            priority: 1
            subject: {namespaces: {}}
            ingress:
            - action: Deny
              from: [{networks: [10.0.0.0/8]}]
            "),
        "spec.ingress[0].from[0]",
        "egress-only peers",
    );
    reject(
        &anp("
            priority: 1
            subject: {namespaces: {}}
            ingress:
            - action: Deny
              from: [{nodes: {}}]
            "),
        "spec.ingress[0].from[0]",
        "egress-only peers",
    );
    accept(&anp("
        priority: 1
        subject: {namespaces: {}}
        egress:
        - action: Deny
          to: [{nodes: {}}]
        - action: Deny
          to: [{networks: [10.0.0.0/8]}]
        "));
}

#[test]
fn admin_ports_exactly_one_form_and_ranges() {
    let with = |port: &str| {
        anp(&format!(
            "
            priority: 1
            subject: {{namespaces: {{}}}}
            egress:
            - action: Deny
              to: [{{namespaces: {{}}}}]
              ports: [{port}]
            "
        ))
    };
    reject(
        &with("{portNumber: {port: 80}, portRange: {start: 80, end: 90}}"),
        "spec.egress[0].ports[0]",
        "exactly one of portNumber, namedPort or portRange",
    );
    reject(
        &with("{}"),
        "spec.egress[0].ports[0]",
        "exactly one of portNumber",
    );
    reject(
        &with("{portRange: {start: 90, end: 80}}"),
        "spec.egress[0].ports[0].portRange",
        "start 90 is above end 80",
    );
    reject(
        &with("{portNumber: {port: 0}}"),
        "spec.egress[0].ports[0].portNumber.port",
        "out of range 1-65535",
    );
    accept(&with("{portNumber: {port: 80, protocol: UDP}}"));
    accept(&with("{namedPort: http}"));
    accept(&with("{portRange: {start: 80, end: 80}}"));
}

#[test]
fn v1alpha2_protocols_exactly_one_form() {
    let with = |p: &str| {
        cnp2(&format!(
            "
            tier: Admin
            priority: 1
            subject: {{namespaces: {{}}}}
            egress:
            - action: Deny
              to: [{{namespaces: {{}}}}]
              protocols: [{p}]
            "
        ))
    };
    reject(
        &with("{tcp: {destinationPort: {number: 80}}, udp: {}}"),
        "spec.egress[0].protocols[0]",
        "exactly one of tcp, udp, sctp or destinationNamedPort",
    );
    reject(
        &with("{tcp: {destinationPort: {range: {start: 90, end: 80}}}}"),
        "spec.egress[0].protocols[0].tcp.destinationPort.range",
        "start 90 is above end 80",
    );
    accept(&with("{tcp: {destinationPort: {number: 80}}}"));
    accept(&with("{destinationNamedPort: http}"));
}

#[test]
fn v1alpha1_kinds_reject_the_tier_field() {
    reject(
        &anp(&format!(
            "tier: Admin\npriority: 1\n{}",
            common::dedent(ANP_RULES)
        )),
        "spec.tier",
        "v1alpha2",
    );
}

// ---------------------------------------------------------------------------------------
// Files, objects and robustness
// ---------------------------------------------------------------------------------------

#[test]
fn an_invalid_object_is_left_out_and_the_others_load() {
    let text = format!(
        "{}---\n{}---\n{}",
        common::cnp_named("first", "endpointSelector: {}\ningress: [{}]"),
        cnp("endpointSelector: {}\ningress: [{fromCIDR: [bogus]}]"),
        common::cnp_named("third", "endpointSelector: {}\negress: [{}]"),
    );
    let (policies, errors, objects) = load(&text, Some(FILE));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].object.as_deref(),
        Some("CiliumNetworkPolicy default/bad")
    );
    let names: Vec<&str> = policies.iter().map(|p| p.object.name.as_str()).collect();
    assert_eq!(names, ["first", "third"]);
    assert_eq!(objects.len(), 3, "all three parsed as objects");
}

#[test]
fn a_type_error_leaves_the_other_objects_loaded() {
    let text = format!(
        "{SIBLING}---\n{}",
        cnp("endpointSelector: {}\ningress: [{toPorts: [{ports: 5}]}]")
    );
    let (policies, errors, _) = load(&text, Some(FILE));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "spec.ingress[0].toPorts[0].ports");
    assert_eq!(
        errors[0].object.as_deref(),
        Some("CiliumNetworkPolicy default/bad")
    );
    assert!(policies.iter().any(|p| p.object.name == "sibling"));
    assert!(policies.iter().all(|p| p.object.name != "bad"));
}

#[test]
fn every_error_names_file_object_and_path() {
    let text = format!(
        "{}---\n{}---\n{}",
        cnp("endpointSelector: {}\ningress: [{fromEntities: [nope]}]"),
        np("podSelector: {}\npolicyTypes: [Sideways]"),
        anp("priority: 2000\nsubject: {namespaces: {}}"),
    );
    let (_, errors, _) = load(&text, Some("dir/p.yaml"));
    let got: Vec<(Option<&str>, Option<&str>, &str)> = errors
        .iter()
        .map(|e| (e.file.as_deref(), e.object.as_deref(), e.path.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                Some("dir/p.yaml"),
                Some("CiliumNetworkPolicy default/bad"),
                "spec.ingress[0].fromEntities[0]"
            ),
            (
                Some("dir/p.yaml"),
                Some("NetworkPolicy default/bad"),
                "spec.policyTypes[0]"
            ),
            (
                Some("dir/p.yaml"),
                Some("AdminNetworkPolicy bad"),
                "spec.priority"
            ),
        ]
    );
    // the line of each object's document
    let lines: Vec<Option<usize>> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [Some(1), Some(8), Some(15)]);
    let shown = errors[0].to_string();
    assert!(
        shown.starts_with("dir/p.yaml:1: CiliumNetworkPolicy default/bad: spec.ingress[0].fromEntities[0]: unknown entity"),
        "{shown}"
    );
}

#[test]
fn yaml_syntax_error_reports_its_line() {
    // line 1-8: valid sibling; line 9: ---; the broken line is line 13
    let text = format!(
        "{SIBLING}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: broken, namespace: default}}\nspec: {{endpointSelector: [}}\n"
    );
    assert_eq!(SIBLING.lines().count(), 8);
    let (policies, errors, _) = load(&text, Some(FILE));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert!(e.reason.starts_with("invalid YAML"), "{e}");
    assert_eq!(e.file.as_deref(), Some(FILE));
    assert_eq!(e.line, Some(13), "{e}");
    assert!(policies.iter().any(|p| p.object.name == "sibling"));
}

#[test]
fn a_yaml_error_in_a_later_line_of_a_document_counts_from_the_file_start() {
    let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: x\n\tnamespace: y\n";
    let (_, errors, _) = load(text, Some(FILE));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].reason.contains("invalid YAML"), "{:?}", errors[0]);
    assert_eq!(errors[0].line, Some(5));
}

#[test]
fn unknown_kinds_are_reported() {
    let bad =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bad, namespace: default}\ndata: {}\n";
    let e = reject(bad, "", "is not a policy kind Ward reads");
    assert_eq!(e.object.as_deref(), Some("ConfigMap default/bad"));
}

#[test]
fn malformed_input_never_panics() {
    let deep_list = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let deep_map = format!("spec: {}x{}", "{a: ".repeat(100), "}".repeat(100));
    let inputs: Vec<String> = vec![
        "\tapiVersion: cilium.io/v2\n".into(),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\tmetadata: {}\n".into(),
        cnp("endpointSelector: {}\ningress: [{toPorts: [{ports: 5}]}]"),
        cnp("endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: [1, 2]}]}]}]"),
        cnp("endpointSelector: []\ningress: {}"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x, namespace: y}\nspec: []\n"
            .into(),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: [1]\nspec: {}\n".into(),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\nspec: 7\n"
            .into(),
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: x}\nspec: {priority: '1', subject: null}\n"
            .into(),
        "apiVersion: 5\nkind: [a]\n".into(),
        "kind: List\napiVersion: v1\nitems: 3\n".into(),
        "--- !!binary AAAA\n".into(),
        "&a [*a]\n".into(),
        "a: *undefined\n".into(),
        "- 1\n- true\n- null\n- 'x'\n".into(),
        deep_list,
        deep_map,
        "{{{{".into(),
        ":\n:\n- :".into(),
        "\u{feff}\u{0}\u{7}".into(),
        String::new(),
        "---\n---\n...\n".into(),
    ];
    for input in &inputs {
        let r = std::panic::catch_unwind(|| load(input, Some(FILE)));
        assert!(r.is_ok(), "load panicked on {input:?}");
    }
    // the malformed policies are all reported, none loaded
    for input in &inputs[2..10] {
        let (policies, errors, _) = load(input, Some(FILE));
        assert!(policies.is_empty(), "{input:?} loaded");
        assert!(!errors.is_empty(), "{input:?} gave no error");
    }
}
