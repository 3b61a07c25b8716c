// Boot the test guest through anyvm's C++ API, run a "build" in it, check its output, stop it;
// then run a system test as a transient job in a throwaway clone of it.
#include <anyvm.hh>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " GUEST_DIR\n";
    return 2;
  }
  const std::string guest = argv[1];
  const std::string disk = "/var/tmp/rm_vm_check-" + std::to_string(getpid()) + ".qcow2";
  {
    std::ifstream src(guest + "/data.qcow2", std::ios::binary);
    std::ofstream dst(disk, std::ios::binary);
    dst << src.rdbuf();
  }
  const std::string name = "rm-check-" + std::to_string(getpid());
  const std::string spec = "{\"name\":\"" + name + "\",\"memory_mib\":192,\"accel\":\"tcg\","
      "\"boot\":{\"kind\":\"kernel\",\"kernel\":\"" + guest + "/vmlinuz\",\"initrd\":\"" + guest + "/initrd.img\","
      "\"cmdline\":\"console=ttyS0 quiet\"},\"disks\":[{\"path\":\"" + disk + "\"}]}";
  int rc = 1;
  try {
    auto client = anyvm::Client::open();
    anyvm::Vm vm = client.define_json(spec);
    try {
      vm.start();
      vm.wait_ready(120.0);
      auto r = vm.exec({"sh", "-c", "cd \"$1\" && echo 'int main(){return 0;}' > main.c && ls main.c && uname -m", "sh", "/tmp"},
                       anyvm::ExecOptions{}.timeout(60));
      std::cout << r.stdout_text();
      rc = (r.exit_code == 0 && r.stdout_text() == "main.c\nx86_64\n") ? 0 : 1;
      std::cout << (rc == 0 ? "build step OK" : "build step FAILED") << " in " << vm.name() << "\n";
      // A long build step's log, line by line as the guest writes it.
      std::string log;
      vm.exec_stream({"sh", "-c", "echo step1; sleep 1; echo step2"},
                     [&](anyvm_output_stream_t, const std::uint8_t *d, std::size_t n) {
                       log.append(reinterpret_cast<const char *>(d), n);
                       std::cout << "  | " << std::string(reinterpret_cast<const char *>(d), n) << std::flush;
                       return true;
                     });
      if (log != "step1\nstep2\n") rc = 1;
      try {
        vm.exec({"sh", "-c", "exit 3"}).check();
        rc = 1;
      } catch (const anyvm::Error &e) {
        std::cout << "check(): " << e.what() << "\n";
        if (e.kind() != ANYVM_ERROR_GUEST_COMMAND || !e.has_exit_code() || e.exit_code() != 3) rc = 1;
      }
      try {
        vm.exec({"false"});
        vm.snapshot_restore("does-not-exist");
      } catch (const anyvm::Error &e) {
        std::cout << "expected error (kind " << e.kind() << "): " << e.what() << "\n";
        if (e.kind() != ANYVM_ERROR_NOT_FOUND) rc = 1;
      }
    } catch (...) {
      vm.destroy();
      throw;
    }
    vm.stop();
    // The same VM, now off, as the template of a transient job: a system test in a throwaway
    // linked clone that is removed whatever the test does.
    const std::string input = "/var/tmp/rm_vm_check-" + std::to_string(getpid()) + ".cfg";
    std::ofstream(input) << "release=1.2.3\n";
    anyvm::Events events = client.events();
    std::string seen;  // the same phases, through the job's own callback
    anyvm::JobReport rep = client.job(name, {"sh", "-c", "grep -c release= /work/release.cfg"})
                               .input(input, "/work/release.cfg")
                               .timeout(120)
                               .on_phase([&](const std::string &phase, const std::string &) {
                                 seen += phase + " ";
                                 return true;
                               })
                               .run();
    std::remove(input.c_str());
    std::cout << "system test job: exit status " << rep.exit_status << ", output " << rep.stdout_text();
    if (rep.outcome != anyvm::JobOutcome::Succeeded || rep.stdout_text() != "1\n") rc = 1;
    // The job's phases as the event stream announced them, each as it began.
    std::string phases;
    while (auto e = events.next(0))
      if (e->type == ANYVM_EVENT_JOB) phases += e->phase + " ";
    std::cout << "job phases: " << phases << "\n";
    if (phases.find("ready ") == std::string::npos || phases.find("run ") == std::string::npos ||
        phases.find("teardown ") == std::string::npos) {
      std::cerr << "the event stream missed job phases: " << phases << "\n";
      rc = 1;
    }
    if (seen != phases) {
      std::cerr << "the phase callback saw '" << seen << "', the stream '" << phases << "'\n";
      rc = 1;
    }
    vm.destroy();
  } catch (const anyvm::Error &e) {
    std::cerr << "anyvm error (kind " << e.kind() << "): " << e.what() << "\n";
    rc = 1;
  }
  std::remove(disk.c_str());
  return rc;
}
