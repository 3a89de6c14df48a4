//! bind-input: the seed's example, arguments, statuses, data and signals.

use crate::util::*;

/// The seed's example, verbatim but for the port.
#[test]
fn seed_example_loop() {
    let env = Env::new();
    let port = free_port();
    let sender = std::thread::spawn(move || {
        for word in ["hello", "world"] {
            send(port, format!("{word}\n").as_bytes());
        }
        send(port, b"END\n");
    });
    let script = format!(
        r#"
        pid=$(bind-input in1 {port})
        fifo=${{FIFOBIND_DIR:-$XDG_RUNTIME_DIR/fifobind}}/in1
        while true; do
            read -t 1 line < "$fifo"
            [ -z "$line" ] && continue      # nothing received this second
            [ "$line" = END ] && break
            echo "got: $line"
        done
        kill "$pid"
        "#
    );
    let out = env.bash(&script);
    sender.join().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got: hello\ngot: world\n"
    );
    env.assert_clean();
}
