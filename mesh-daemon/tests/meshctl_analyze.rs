//! `meshctl analyze` as a user runs it: exit codes a pipeline can gate on, and JSON.
use std::process::Command;

fn meshctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("run meshctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write manifest");
}

#[test]
fn analyze_exits_79_on_errors_and_0_when_clean_with_json_output() {
    let dir = std::env::temp_dir().join(format!("sidelane-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tutorial = concat!(env!("CARGO_MANIFEST_DIR"), "/../demo/tutorial");
    write(
        &dir,
        "cluster.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: production, labels: {istio-injection: enabled}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: api-server, namespace: production}\n\
         spec: {ports: [{name: http, port: 8080}]}\n",
    );

    // The tutorial's canary routing plus its DestinationRule and the Service: consistent
    // (only the DestinationRule's traffic policy is reported, as not applied yet).
    let (code, out) = meshctl(&[
        "analyze",
        "-f",
        dir.to_str().expect("utf-8"),
        "-f",
        &format!("{tutorial}/virtualservice.yaml"),
        "-f",
        &format!("{tutorial}/destinationrule.yaml"),
        "-o",
        "json",
    ]);
    let messages: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(code, 0, "{out}");
    assert!(
        messages
            .as_array()
            .expect("array")
            .iter()
            .all(|m| m["level"] != "Error"),
        "{out}"
    );

    // Without the DestinationRule the subsets are missing: an error, exit 79.
    let (code, out) = meshctl(&[
        "analyze",
        "-f",
        dir.to_str().expect("utf-8"),
        "-f",
        &format!("{tutorial}/virtualservice.yaml"),
    ]);
    assert_eq!(code, 79, "{out}");
    assert!(
        out.contains("Error [IST0101] (VirtualService production/api-server")
            && out.contains("\"api-server+v1\""),
        "{out}"
    );

    // A file Istio would reject: the error names the field; other namespaces can be filtered out.
    write(
        &dir,
        "bad.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: staging}\nspec:\n  hosts: [x]\n  http: [{route: [{destination: {host: x}}], retries: {attempts: 2, retryOn: sometimes}}]\n",
    );
    let (code, out) = meshctl(&["analyze", "-f", dir.to_str().expect("utf-8")]);
    assert_eq!(code, 79, "{out}");
    assert!(
        out.contains("spec.http[0].retries.retryOn: \"sometimes\" is not a valid retryOn policy"),
        "{out}"
    );
    let (code, out) = meshctl(&[
        "analyze",
        "-f",
        dir.to_str().expect("utf-8"),
        "-n",
        "production",
    ]);
    assert_eq!(code, 0, "{out}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
