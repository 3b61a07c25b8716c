/**
 * \file anyvm.hh
 * \brief Header-only C++17 wrapper over anyvm.h: RAII handles, std::string/std::vector, and
 *        exceptions (anyvm::Error with the core's kind and message).
 *
 * \code
 *   auto client = anyvm::Client::open_config("anyvm.toml");
 *   anyvm::Vm vm = client.up("build1");
 *   anyvm::ExecResult r = vm.exec({"make", "-j2"}, anyvm::ExecOptions{}.cwd("/src"));
 *   if (r.exit_code != 0) std::cerr << r.stderr_text();
 *   vm.stop();
 *   // A system test in a throwaway clone of an (off) template, removed whatever happens:
 *   anyvm::JobReport rep = client.job("sl6-template", {"./run_tests.sh"}).input("tests", "/work/tests").run();
 * \endcode
 */
#ifndef ANYVM_HH
#define ANYVM_HH

#include "anyvm.h"

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace anyvm {

/** An anyvm failure: kind() mirrors anyvm_error_kind_t, what() is the message. */
class Error : public std::runtime_error {
public:
  Error(anyvm_error_kind_t kind, const std::string &message, std::optional<int> exit_code = std::nullopt)
      : std::runtime_error(message), kind_(kind), exit_code_(exit_code) {}
  anyvm_error_kind_t kind() const noexcept { return kind_; }
  /** For ANYVM_ERROR_GUEST_COMMAND: whether the program exited (rather than being killed). */
  bool has_exit_code() const noexcept { return exit_code_.has_value(); }
  /** The guest program's exit code; -1 when has_exit_code() is false. */
  int exit_code() const noexcept { return exit_code_.value_or(-1); }

private:
  anyvm_error_kind_t kind_;
  std::optional<int> exit_code_;
};

namespace detail {
/** Throw if `err` is set, freeing it first. */
inline void check(anyvm_error_t *err) {
  if (err == nullptr) return;
  const char *msg = anyvm_error_message(err);
  std::string text = msg ? msg : "unknown anyvm error";
  anyvm_error_kind_t kind = anyvm_error_kind(err);
  int code = 0;
  std::optional<int> exit_code;
  if (anyvm_error_exit_code(err, &code)) exit_code = code;
  anyvm_error_delete(err);
  throw Error(kind, text, exit_code);
}

inline std::string take_string(char *s) {
  std::string out = s ? s : "";
  anyvm_string_delete(s);
  return out;
}

template <typename T, void (*Del)(T *)> struct Deleter {
  void operator()(T *p) const noexcept { Del(p); }
};
} // namespace detail

/** What a guest program produced. */
struct ExecResult {
  /** Exit code, or -1 when the program was killed by a signal. */
  int exit_code = -1;
  bool exited = false;
  std::vector<std::uint8_t> stdout_bytes;
  std::vector<std::uint8_t> stderr_bytes;
  double duration = 0.0;
  std::string stdout_text() const { return std::string(stdout_bytes.begin(), stdout_bytes.end()); }
  std::string stderr_text() const { return std::string(stderr_bytes.begin(), stderr_bytes.end()); }
  /** Throw Error(ANYVM_ERROR_GUEST_COMMAND), as the core words it, unless the program exited 0. */
  const ExecResult &check() const {
    if (!failure.empty()) throw Error(ANYVM_ERROR_GUEST_COMMAND, failure, exited ? std::optional<int>(exit_code) : std::nullopt);
    return *this;
  }
  /** The core's message for a program that did not exit 0; empty when it did. */
  std::string failure;
};

/** Options for Vm::exec(), chainable. */
class ExecOptions {
public:
  ExecOptions &env(const std::string &key, const std::string &value) { env_[key] = value; return *this; }
  ExecOptions &cwd(const std::string &dir) { cwd_ = dir; return *this; }
  ExecOptions &stdin_data(std::vector<std::uint8_t> data) { stdin_ = std::move(data); return *this; }
  ExecOptions &stdin_text(const std::string &text) { stdin_ = std::vector<std::uint8_t>(text.begin(), text.end()); return *this; }
  ExecOptions &timeout(double seconds) { timeout_ = seconds; return *this; }

private:
  friend class Vm;
  std::map<std::string, std::string> env_;
  std::optional<std::string> cwd_;
  std::optional<std::vector<std::uint8_t>> stdin_;
  std::optional<double> timeout_;
};

enum class StopOutcome { AlreadyOff, Graceful, Forced };

/** One VM. Move-only; the handle is freed on destruction (the VM itself is untouched). */
class Vm {
public:
  explicit Vm(anyvm_vm_t *raw) : raw_(raw) {}

  std::string name() const {
    char *s = nullptr;
    detail::check(anyvm_vm_name(raw_.get(), &s));
    return detail::take_string(s);
  }

  anyvm_vm_state_t state() const {
    anyvm_vm_state_t s{};
    detail::check(anyvm_vm_state(raw_.get(), &s));
    return s;
  }

  void start() const { detail::check(anyvm_vm_start(raw_.get())); }

  StopOutcome stop(double timeout_s = 60.0, bool force = false) const {
    anyvm_stop_outcome_t o{};
    detail::check(anyvm_vm_stop(raw_.get(), force, timeout_s, &o));
    return o == ANYVM_STOP_GRACEFUL ? StopOutcome::Graceful
         : o == ANYVM_STOP_FORCED   ? StopOutcome::Forced
                                    : StopOutcome::AlreadyOff;
  }

  /// Hardware reset: the guest restarts at once, without a shutdown.
  void reset() const { detail::check(anyvm_vm_reset(raw_.get())); }
  /** Remove the VM. Throws (kind ANYVM_ERROR_INVALID_STATE, naming them) while linked clones
   *  depend on it, unless `with_clones`: then they are destroyed first. */
  void destroy(bool with_clones = false) const {
    detail::check(anyvm_vm_destroy_with(raw_.get(), with_clones ? ANYVM_WITH_CLONES : 0));
  }
  /** Write the powered-off VM as an OVA appliance (VirtualBox). */
  void export_appliance(const std::string &path) const { detail::check(anyvm_vm_export(raw_.get(), path.c_str())); }

  /** Probes: "agent", "tcp:PORT", "ssh:PORT"; empty means the guest agent. */
  void wait_ready(double timeout_s = 120.0, const std::vector<std::string> &probes = {}, bool any = false) const {
    std::vector<const char *> ps;
    for (const auto &p : probes) ps.push_back(p.c_str());
    detail::check(anyvm_vm_wait_ready(raw_.get(), ps.empty() ? nullptr : ps.data(), ps.size(), any, timeout_s));
  }

  /** Run argv[0] with the rest as arguments (no shell). A non-zero exit is a result, not an exception. */
  ExecResult exec(const std::vector<std::string> &argv, const ExecOptions &opts = {}) const {
    Request req = request(argv, opts);
    anyvm_exec_result_t *r = nullptr;
    detail::check(anyvm_vm_exec(raw_.get(), req.get(), &r));
    return result(r);
  }

  /** Called with each output chunk as it arrives; return false to stop the program. */
  using OutputFn = std::function<bool(anyvm_output_stream_t stream, const std::uint8_t *data, std::size_t len)>;

  /** exec() that hands output to `on_output` as it is written; the result then holds no output.
   *  If `on_output` returns false the program is killed and Error(ANYVM_ERROR_CANCELLED) is
   *  thrown; an exception it throws is rethrown after the program is killed. */
  ExecResult exec_stream(const std::vector<std::string> &argv, const OutputFn &on_output,
                         const ExecOptions &opts = {}) const {
    Request req = request(argv, opts);
    struct Ctx {
      const OutputFn *fn;
      std::exception_ptr error;
    } ctx{&on_output, nullptr};
    auto tramp = [](void *ud, anyvm_output_stream_t st, const std::uint8_t *d, std::size_t n) -> int {
      auto *c = static_cast<Ctx *>(ud);
      try {
        return (*c->fn)(st, d, n) ? 0 : 1;
      } catch (...) {
        c->error = std::current_exception();
        return 1;
      }
    };
    anyvm_exec_result_t *r = nullptr;
    anyvm_error_t *err = anyvm_vm_exec_stream(raw_.get(), req.get(), tramp, &ctx, &r);
    if (ctx.error) {
      anyvm_error_delete(err);
      std::rethrow_exception(ctx.error);
    }
    detail::check(err);
    return result(r);
  }

  std::uint64_t copy_to(const std::string &host_path, const std::string &guest_path) const {
    std::uint64_t n = 0;
    detail::check(anyvm_vm_copy_to(raw_.get(), host_path.c_str(), guest_path.c_str(), &n));
    return n;
  }

  std::uint64_t copy_from(const std::string &guest_path, const std::string &host_path) const {
    std::uint64_t n = 0;
    detail::check(anyvm_vm_copy_from(raw_.get(), guest_path.c_str(), host_path.c_str(), &n));
    return n;
  }

  /** Forward a host port (0 = allocate one) to `guest_port`; returns the host port. */
  std::uint16_t forward_add(const std::string &name, std::uint16_t guest_port, std::uint16_t host_port = 0) const {
    std::uint16_t out = 0;
    detail::check(anyvm_vm_forward_add(raw_.get(), name.c_str(), guest_port, host_port, &out));
    return out;
  }

  void forward_remove(const std::string &name) const { detail::check(anyvm_vm_forward_remove(raw_.get(), name.c_str())); }

  /** JSON array of {name, proto, host_addr, host_port, guest_port}. */
  std::string forwards_json() const {
    char *s = nullptr;
    detail::check(anyvm_vm_forwards_json(raw_.get(), &s));
    return detail::take_string(s);
  }

  /** Save a PNG of the guest's screen; returns {width, height}. */
  std::pair<std::uint32_t, std::uint32_t> screenshot(const std::string &path) const {
    std::uint32_t w = 0, h = 0;
    detail::check(anyvm_vm_screenshot(raw_.get(), path.c_str(), &w, &h));
    return {w, h};
  }
  /** Where a viewer reaches the screen, as JSON ("null" when the VM has none). */
  std::string remote_display_json() const {
    char *s = nullptr;
    detail::check(anyvm_vm_remote_display_json(raw_.get(), &s));
    return detail::take_string(s);
  }

  void snapshot_take(const std::string &name) const { detail::check(anyvm_vm_snapshot_take(raw_.get(), name.c_str())); }
  void snapshot_restore(const std::string &name) const { detail::check(anyvm_vm_snapshot_restore(raw_.get(), name.c_str())); }
  void snapshot_delete(const std::string &name) const { detail::check(anyvm_vm_snapshot_delete(raw_.get(), name.c_str())); }

  std::string ssh_config(const std::string &user = "", const std::string &identity_file = "") const {
    char *s = nullptr;
    detail::check(anyvm_vm_ssh_config(raw_.get(), user.empty() ? nullptr : user.c_str(),
                                      identity_file.empty() ? nullptr : identity_file.c_str(), &s));
    return detail::take_string(s);
  }

  anyvm_vm_t *raw() const noexcept { return raw_.get(); }

private:
  using Request = std::unique_ptr<anyvm_exec_t, detail::Deleter<anyvm_exec_t, anyvm_exec_delete>>;

  static Request request(const std::vector<std::string> &argv, const ExecOptions &opts) {
    if (argv.empty()) throw Error(ANYVM_ERROR_INVALID_ARGUMENT, "invalid argument: argv: must name a program");
    anyvm_exec_t *e = nullptr;
    detail::check(anyvm_exec_new(argv[0].c_str(), &e));
    Request req(e);
    for (std::size_t i = 1; i < argv.size(); ++i) detail::check(anyvm_exec_arg(e, argv[i].c_str()));
    for (const auto &kv : opts.env_) detail::check(anyvm_exec_env(e, kv.first.c_str(), kv.second.c_str()));
    if (opts.cwd_) detail::check(anyvm_exec_cwd(e, opts.cwd_->c_str()));
    if (opts.stdin_) detail::check(anyvm_exec_stdin(e, opts.stdin_->data(), opts.stdin_->size()));
    if (opts.timeout_) detail::check(anyvm_exec_timeout(e, *opts.timeout_));
    return req;
  }

  static ExecResult result(anyvm_exec_result_t *r) {
    std::unique_ptr<anyvm_exec_result_t, detail::Deleter<anyvm_exec_result_t, anyvm_exec_result_delete>> res(r);
    ExecResult out;
    out.exited = anyvm_exec_result_exited(r);
    out.exit_code = anyvm_exec_result_exit_code(r);
    out.duration = anyvm_exec_result_duration(r);
    std::size_t n = 0;
    const std::uint8_t *p = anyvm_exec_result_stdout(r, &n);
    out.stdout_bytes.assign(p, p + n);
    p = anyvm_exec_result_stderr(r, &n);
    out.stderr_bytes.assign(p, p + n);
    if (anyvm_error_t *f = anyvm_exec_result_check(r)) {
      const char *m = anyvm_error_message(f);
      out.failure = m ? m : "guest command failed";
      anyvm_error_delete(f);
    }
    return out;
  }
  std::unique_ptr<anyvm_vm_t, detail::Deleter<anyvm_vm_t, anyvm_vm_delete>> raw_;
};

/** How a transient job ended (mirrors anyvm_job_outcome_t). */
enum class JobOutcome { Succeeded = 1, Failed = 2, TimedOut = 3, Cancelled = 4, Error = 5 };

/** What a transient job did. `json` has the phases, timings, error and console log. */
struct JobReport {
  JobOutcome outcome = JobOutcome::Error;
  /** The command's exit code; 124 timeout, 125 anyvm failure, 128+N signal N, 130 cancelled. */
  int exit_status = -1;
  std::vector<std::uint8_t> stdout_bytes;
  std::vector<std::uint8_t> stderr_bytes;
  std::string json;
  std::string stdout_text() const { return std::string(stdout_bytes.begin(), stdout_bytes.end()); }
  std::string stderr_text() const { return std::string(stderr_bytes.begin(), stderr_bytes.end()); }
};

/** Cancels running jobs from another thread (not from a signal handler). Move-only. */
class Cancel {
public:
  Cancel() {
    anyvm_cancel_t *c = nullptr;
    detail::check(anyvm_cancel_new(&c));
    raw_.reset(c);
  }
  void trigger() const { detail::check(anyvm_cancel_trigger(raw_.get())); }
  anyvm_cancel_t *raw() const noexcept { return raw_.get(); }

private:
  std::unique_ptr<anyvm_cancel_t, detail::Deleter<anyvm_cancel_t, anyvm_cancel_delete>> raw_;
};

/** A command to run in a fresh linked clone of a template VM; the clone is always removed.
 *  Build with Client::job(), chain the options, then run(). Move-only. */
class Job {
public:
  Job &input(const std::string &host_path, const std::string &guest_path) {
    detail::check(anyvm_job_input(raw_.get(), host_path.c_str(), guest_path.c_str()));
    return *this;
  }
  Job &output(const std::string &guest_path, const std::string &host_path) {
    detail::check(anyvm_job_output(raw_.get(), guest_path.c_str(), host_path.c_str()));
    return *this;
  }
  Job &env(const std::string &key, const std::string &value) {
    detail::check(anyvm_job_env(raw_.get(), key.c_str(), value.c_str()));
    return *this;
  }
  /// Boot the clone instead of starting it from the template's warm state.
  Job &cold(bool yes = true) {
    detail::check(anyvm_job_cold(raw_.get(), yes ? 1 : 0));
    return *this;
  }
  Job &timeout(double seconds) {
    detail::check(anyvm_job_timeout(raw_.get(), seconds));
    return *this;
  }
  /** Call `f(phase, clone)` as each phase begins ("clone", ..., "teardown"; clone "" until it
   *  has a name), on the thread that runs the job; returning false (or throwing) cancels the
   *  job, and run() then rethrows what it threw. */
  Job &on_phase(std::function<bool(const std::string &phase, const std::string &vm)> f) {
    hook_ = std::make_unique<Hook>();
    hook_->fn = std::move(f);
    detail::check(anyvm_job_on_phase(raw_.get(), &Job::trampoline, hook_.get()));
    return *this;
  }

  /** Run to the end. A failing command is a report, not an exception. */
  JobReport run(const Cancel *cancel = nullptr) const {
    anyvm_job_report_t *r = nullptr;
    if (hook_) hook_->error = nullptr;
    detail::check(anyvm_job_run(raw_.get(), cancel ? cancel->raw() : nullptr, &r));
    std::unique_ptr<anyvm_job_report_t, detail::Deleter<anyvm_job_report_t, anyvm_job_report_delete>> owned(r);
    if (hook_ && hook_->error) std::rethrow_exception(hook_->error);
    JobReport out;
    out.outcome = static_cast<JobOutcome>(anyvm_job_report_outcome(r));
    out.exit_status = anyvm_job_report_exit_status(r);
    size_t n = 0;
    const std::uint8_t *p = anyvm_job_report_stdout(r, &n);
    out.stdout_bytes.assign(p, p + n);
    p = anyvm_job_report_stderr(r, &n);
    out.stderr_bytes.assign(p, p + n);
    char *json = nullptr;
    detail::check(anyvm_job_report_json(r, &json));
    out.json = detail::take_string(json);
    return out;
  }

private:
  friend class Client;
  struct Hook {
    std::function<bool(const std::string &, const std::string &)> fn;
    std::exception_ptr error;
  };
  // No exception may cross into the C library: it is kept and rethrown by run().
  static int trampoline(void *ud, const char *, const char *phase, const char *vm) {
    auto *h = static_cast<Hook *>(ud);
    try {
      return h->fn(phase, vm ? vm : "") ? 0 : 1;
    } catch (...) {
      h->error = std::current_exception();
      return 1;
    }
  }
  explicit Job(anyvm_job_t *raw) : raw_(raw) {}
  std::unique_ptr<anyvm_job_t, detail::Deleter<anyvm_job_t, anyvm_job_delete>> raw_;
  std::unique_ptr<Hook> hook_;
};

/** One event of a client's stream (see anyvm_event_type_t for which fields each type fills). */
struct Event {
  anyvm_event_type_t type = ANYVM_EVENT_NONE;
  /** The VM it is about (a job's clone once it has a name); empty if none. */
  std::string vm;
  /** VM events: "defined", "started", "stopped", "agent_connected", ... */
  std::string kind;
  /** Job events: the job's id and the phase it entered ("clone", "boot", "ready", "run", ...). */
  std::string job, phase;
  /** Copy events: bytes done, in all (-1 unknown) and whether the copy ended. */
  std::uint64_t done = 0;
  std::int64_t total = -1;
  bool finished = false;
  /** Lagged: events dropped for a slow reader. */
  std::uint64_t missed = 0;
  /** The whole event as the core's JSON (the shape of Python's event dicts). */
  std::string json;
};

/** A client's events from the moment Client::events() made it. Move-only. */
class Events {
public:
  /** The next event, waiting at most `timeout_s` seconds (0: only one already waiting; negative:
   *  as long as it takes); std::nullopt when none came in time. */
  std::optional<Event> next(double timeout_s = -1) {
    anyvm_event_t *e = nullptr;
    detail::check(anyvm_events_next(raw_.get(), timeout_s, &e));
    if (e == nullptr) return std::nullopt;
    std::unique_ptr<anyvm_event_t, detail::Deleter<anyvm_event_t, anyvm_event_delete>> owned(e);
    auto str = [](const char *p) { return std::string(p ? p : ""); };
    Event out;
    out.type = anyvm_event_type(e);
    out.vm = str(anyvm_event_vm(e));
    out.kind = str(anyvm_event_kind(e));
    out.job = str(anyvm_event_job(e));
    out.phase = str(anyvm_event_phase(e));
    anyvm_event_copy(e, &out.done, &out.total, &out.finished);
    out.missed = anyvm_event_missed(e);
    char *json = nullptr;
    detail::check(anyvm_event_json(e, &json));
    out.json = detail::take_string(json);
    return out;
  }

private:
  friend class Client;
  explicit Events(anyvm_events_t *raw) : raw_(raw) {}
  std::unique_ptr<anyvm_events_t, detail::Deleter<anyvm_events_t, anyvm_events_delete>> raw_;
};

/** A connection to one hypervisor. Move-only. */
class Client {
public:
  /** "libvirt:qemu:///system", "virtualbox", "vmware:ws". */
  static Client open(const std::string &uri = "libvirt:qemu:///system", const std::string &state_dir = "") {
    anyvm_client_t *c = nullptr;
    detail::check(anyvm_client_open(uri.c_str(), state_dir.empty() ? nullptr : state_dir.c_str(), &c));
    return Client(c);
  }

  /** Backend and machines from an anyvm.toml. */
  static Client open_config(const std::string &path) {
    anyvm_client_t *c = nullptr;
    detail::check(anyvm_client_open_config(path.c_str(), &c));
    return Client(c);
  }

  Vm vm(const std::string &name) const {
    anyvm_vm_t *v = nullptr;
    detail::check(anyvm_vm_open(raw_.get(), name.c_str(), &v));
    return Vm(v);
  }

  /** Define from a JSON VmSpec. */
  Vm define_json(const std::string &spec_json) const {
    anyvm_vm_t *v = nullptr;
    detail::check(anyvm_vm_define_json(raw_.get(), spec_json.c_str(), &v));
    return Vm(v);
  }

  /** Define if needed, start and wait ready, for a machine of the config (timeout <= 0: the config's). */
  Vm up(const std::string &name, double timeout_s = 0) const {
    anyvm_vm_t *v = nullptr;
    detail::check(anyvm_client_up(raw_.get(), name.c_str(), timeout_s, &v));
    return Vm(v);
  }

  /** A transient job: `argv` in a fresh clone of `template_name` (empty: the profile's machine,
   *  whose resources are then checked first). */
  Job job(const std::string &template_name, const std::vector<std::string> &argv, const std::string &profile = "") const {
    if (argv.empty()) throw Error(ANYVM_ERROR_INVALID_ARGUMENT, "invalid argument: argv: must not be empty");
    anyvm_job_t *j = nullptr;
    detail::check(anyvm_job_new(raw_.get(), template_name.empty() ? nullptr : template_name.c_str(),
                                profile.empty() ? nullptr : profile.c_str(), argv[0].c_str(), &j));
    Job job(j);
    for (size_t i = 1; i < argv.size(); ++i) detail::check(anyvm_job_arg(j, argv[i].c_str()));
    return job;
  }

  /** Health checks of the backend and the host as JSON; `failed` tells whether any failed. */
  std::string doctor(bool *failed = nullptr) const {
    char *s = nullptr;
    bool f = false;
    detail::check(anyvm_client_doctor(raw_.get(), &s, &f));
    if (failed) *failed = f;
    return detail::take_string(s);
  }

  /** Everything that happens from now on to this client's VMs, jobs and copies. */
  Events events() const {
    anyvm_events_t *e = nullptr;
    detail::check(anyvm_client_events(raw_.get(), &e));
    return Events(e);
  }

  /** Remove job clones whose owner process is gone; returns the JSON report. */
  std::string gc(bool dry_run = false) const {
    char *s = nullptr;
    detail::check(anyvm_client_gc(raw_.get(), dry_run, &s));
    return detail::take_string(s);
  }

private:
  explicit Client(anyvm_client_t *raw) : raw_(raw) {}
  std::unique_ptr<anyvm_client_t, detail::Deleter<anyvm_client_t, anyvm_client_delete>> raw_;
};

} // namespace anyvm

#endif // ANYVM_HH
