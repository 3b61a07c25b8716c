use super::*;
use crate::name::VmName;
use serde::Deserialize;

#[test]
fn host_port_parses_auto_and_numbers() {
    assert_eq!("auto".parse::<HostPort>().unwrap(), HostPort::Auto);
    assert_eq!("2222".parse::<HostPort>().unwrap(), HostPort::Fixed(2222));
    assert!("0".parse::<HostPort>().is_err());
    assert!("70000".parse::<HostPort>().is_err());
    #[derive(Deserialize)]
    struct T {
        p: HostPort,
    }
    assert_eq!(
        toml::from_str::<T>("p = 22").unwrap().p,
        HostPort::Fixed(22)
    );
    assert_eq!(
        toml::from_str::<T>("p = \"auto\"").unwrap().p,
        HostPort::Auto
    );
    assert!(toml::from_str::<T>("p = \"x\"").is_err());
}

#[test]
fn exec_request_validation() {
    assert!(ExecRequest::new("/bin/true").validate().is_ok());
    assert!(ExecRequest::new("").validate().is_err());
    assert!(ExecRequest::new("a").arg("b\0c").validate().is_err());
    assert!(ExecRequest::new("a").env("A=B", "c").validate().is_err());
    assert!(ExecRequest::from_argv::<&str>(&[]).is_err());
    let r = ExecRequest::from_argv(&["sh", "-c", "echo hi"]).unwrap();
    assert_eq!(r.display_argv(), "sh -c echo hi");
}

#[test]
fn spec_validation_names_the_problem() {
    let mut s = VmSpec::new(
        VmName::new("v").unwrap(),
        Boot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    assert!(s.validate().is_ok());
    s.forwards = vec![ForwardSpec::new("ssh", 22), ForwardSpec::new("ssh", 23)];
    assert!(s.validate().unwrap_err().to_string().contains("used twice"));
    s.forwards = vec![ForwardSpec::new("s;h", 22)];
    assert!(s.validate().is_err());
    s.forwards.clear();
    s.memory_mib = 1;
    assert!(s.validate().unwrap_err().to_string().contains("memory_mib"));
}
