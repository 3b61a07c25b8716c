/* The C ABI against the real libvirtd and test guest: argument checking (NULL, bad UTF-8,
 * use after delete), error kinds and messages, a full VM session, and transient jobs
 * (staging, exit codes, cancellation from another thread, gc).
 * Usage: test_capi GUEST_DIR WORK_DIR */
#include <anyvm.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long getpid_or_zero(void) { return (long)getpid(); }

static int passed, failed;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (cond) {                                                       \
      passed++;                                                       \
    } else {                                                          \
      failed++;                                                       \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                   \
      fputc('\n', stderr);                                            \
    }                                                                 \
  } while (0)

/* Expect an error of `kind` whose message contains `needle`; frees it. */
static void expect_error(anyvm_error_t *err, anyvm_error_kind_t kind, const char *needle, const char *what) {
  CHECK(err != NULL, "%s: expected an error", what);
  if (!err) return;
  const char *msg = anyvm_error_message(err);
  CHECK(anyvm_error_kind(err) == kind, "%s: kind %d, message: %s", what, anyvm_error_kind(err), msg);
  CHECK(msg && strstr(msg, needle), "%s: message '%s' lacks '%s'", what, msg, needle);
  anyvm_error_delete(err);
}

/* Output collected by on_chunk(); stop_after > 0 stops the program after that many chunks. */
struct chunks {
  char out[256], err[256];
  int calls, stop_after;
};

static int on_chunk(void *ud, anyvm_output_stream_t stream, const uint8_t *data, size_t len) {
  struct chunks *c = ud;
  char *dst = stream == ANYVM_STDOUT ? c->out : c->err;
  size_t have = strlen(dst);
  if (have + len < sizeof c->out) {
    memcpy(dst + have, data, len);
    dst[have + len] = 0;
  }
  c->calls++;
  return c->stop_after > 0 && c->calls >= c->stop_after;
}

/* Abort the session on an unexpected error. */
static void ok(anyvm_error_t *err, const char *what) {
  if (!err) {
    passed++;
    return;
  }
  fprintf(stderr, "FATAL %s: %s\n", what, anyvm_error_message(err));
  anyvm_error_delete(err);
  failed++;
  printf("%d passed, %d failed\n", passed, failed);
  exit(1);
}

static void argument_checks(anyvm_client_t *client) {
  anyvm_vm_t *vm = NULL;
  expect_error(anyvm_client_open(NULL, NULL, NULL), ANYVM_ERROR_INVALID_ARGUMENT, "must not be NULL", "NULL out");
  expect_error(anyvm_vm_open(NULL, "x", &vm), ANYVM_ERROR_INVALID_ARGUMENT, "anyvm_client_t", "NULL client");
  expect_error(anyvm_vm_open(client, NULL, &vm), ANYVM_ERROR_INVALID_ARGUMENT, "name", "NULL name");
  expect_error(anyvm_vm_open(client, "\xff\xfe", &vm), ANYVM_ERROR_INVALID_ARGUMENT, "not valid UTF-8", "bad UTF-8");
  expect_error(anyvm_vm_open(client, "a;rm -rf /", &vm), ANYVM_ERROR_INVALID_ARGUMENT, "not allowed", "shell chars");
  expect_error(anyvm_vm_open(client, "capi-no-such-vm", &vm), ANYVM_ERROR_NOT_FOUND, "vm 'capi-no-such-vm'", "unknown VM");
  CHECK(vm == NULL, "out-parameter written on error");
  expect_error(anyvm_vm_start(NULL), ANYVM_ERROR_INVALID_ARGUMENT, "anyvm_vm_t", "NULL vm");
  expect_error(anyvm_vm_define_json(client, "{not json", &vm), ANYVM_ERROR_INVALID_ARGUMENT, "spec_json", "bad json");

  /* use after delete and double delete are reported, not crashes */
  anyvm_exec_t *e = NULL;
  ok(anyvm_exec_new("true", &e), "exec_new");
  anyvm_exec_delete(e);
  expect_error(anyvm_exec_arg(e, "x"), ANYVM_ERROR_INVALID_ARGUMENT, "not a live handle", "use after delete");
  anyvm_exec_delete(e);
  expect_error(anyvm_exec_timeout(NULL, 1.0), ANYVM_ERROR_INVALID_ARGUMENT, "must not be NULL", "NULL exec");
  ok(anyvm_exec_new("true", &e), "exec_new");
  expect_error(anyvm_exec_timeout(e, 0.0), ANYVM_ERROR_INVALID_ARGUMENT, "positive", "zero timeout");
  expect_error(anyvm_exec_stdin(e, NULL, 5), ANYVM_ERROR_INVALID_ARGUMENT, "NULL", "NULL stdin with length");
  anyvm_exec_delete(e);
  expect_error(anyvm_exec_new("", &e), ANYVM_ERROR_INVALID_ARGUMENT, "empty", "empty program");

  CHECK(anyvm_error_message(NULL) == NULL, "message of NULL error");
  anyvm_error_delete(NULL);
  anyvm_string_delete(NULL);
}

/* What the event stream saw of the session: the VM's life in order (libvirt's own events, which
 * may trail the calls, hence the waits) and the copy to the guest ending at its 25 bytes. */
static void session_events(anyvm_events_t *events, const char *name) {
  const char *want[] = {"defined", "started", "agent_connected", "stopped", "undefined"};
  size_t next = 0;
  int copy_done = 0;
  anyvm_event_t *ev = NULL;
  while (next < sizeof want / sizeof *want) {
    ok(anyvm_events_next(events, 30.0, &ev), "events_next");
    CHECK(ev != NULL, "no '%s' event for %s within 30 s", want[next], name);
    if (!ev) return;
    const char *vm = anyvm_event_vm(ev);
    anyvm_event_type_t t = anyvm_event_type(ev);
    if (t == ANYVM_EVENT_VM && vm && strcmp(vm, name) == 0 && strcmp(anyvm_event_kind(ev), want[next]) == 0) next++;
    uint64_t done = 0;
    int64_t total = 0;
    bool finished = false;
    if (anyvm_event_copy(ev, &done, &total, &finished)) {
      CHECK(t == ANYVM_EVENT_COPY && anyvm_event_kind(ev) == NULL, "copy event type %d", t);
      if (finished && total == 25 && done == 25) copy_done = 1;
    }
    if (t == ANYVM_EVENT_VM) {
      char *json = NULL;
      ok(anyvm_event_json(ev, &json), "event_json");
      CHECK(strstr(json, "{\"type\":\"vm\",\"vm\":\"") == json && strstr(json, anyvm_event_kind(ev)), "%s", json);
      anyvm_string_delete(json);
    }
    anyvm_event_delete(ev);
  }
  CHECK(copy_done, "no finished copy event of 25 bytes");
  anyvm_event_delete(ev); /* double delete is ignored */
  CHECK(anyvm_event_type(ev) == ANYVM_EVENT_NONE && anyvm_event_vm(ev) == NULL, "accessors of a deleted event");
  CHECK(!anyvm_event_copy(NULL, NULL, NULL, NULL) && anyvm_event_missed(NULL) == 0, "accessors of NULL");
  expect_error(anyvm_events_next(NULL, 0, &ev), ANYVM_ERROR_INVALID_ARGUMENT, "anyvm_events_t", "NULL stream");
  expect_error(anyvm_events_next(events, 0, NULL), ANYVM_ERROR_INVALID_ARGUMENT, "out", "NULL out");
  /* Drained: a poll returns at once with nothing; a short wait returns nothing after it. */
  do {
    ok(anyvm_events_next(events, 0, &ev), "poll");
    anyvm_event_delete(ev);
  } while (ev);
  ok(anyvm_events_next(events, 0.2, &ev), "short wait");
  CHECK(ev == NULL || anyvm_event_vm(ev) == NULL || strcmp(anyvm_event_vm(ev), name) != 0,
        "an event of %s after it was undefined: %s", name, anyvm_event_kind(ev));
  anyvm_event_delete(ev);
}

static void session(anyvm_client_t *client, const char *guest, const char *work) {
  char spec[4096], cmd[4096], name[64];
  snprintf(name, sizeof name, "capi-%d", (int)getpid_or_zero());
  snprintf(cmd, sizeof cmd, "cp %s/data.qcow2 %s/capi.qcow2", guest, work);
  CHECK(system(cmd) == 0, "copy disk");
  snprintf(spec, sizeof spec,
           "{\"name\":\"%s\",\"memory_mib\":192,\"accel\":\"tcg\","
           "\"boot\":{\"kind\":\"kernel\",\"kernel\":\"%s/vmlinuz\",\"initrd\":\"%s/initrd.img\",\"cmdline\":\"console=ttyS0 quiet\"},"
           "\"disks\":[{\"path\":\"%s/capi.qcow2\"}],\"forwards\":[{\"name\":\"ssh\",\"guest_port\":22}]}",
           name, guest, guest, work);
  anyvm_events_t *events = NULL;
  ok(anyvm_client_events(client, &events), "events");
  anyvm_vm_t *vm = NULL;
  ok(anyvm_vm_define_json(client, spec, &vm), "define");
  anyvm_vm_state_t st;
  ok(anyvm_vm_state(vm, &st), "state");
  CHECK(st == ANYVM_STATE_SHUT_OFF, "state %d", st);
  ok(anyvm_vm_start(vm), "start");
  const char *probes[] = {"agent", "ssh:22", "command:[\"test\", \"-d\", \"/proc/1\"]"};
  ok(anyvm_vm_wait_ready(vm, probes, 3, false, 120.0), "wait_ready");
  const char *bad[] = {"psychic"};
  expect_error(anyvm_vm_wait_ready(vm, bad, 1, false, 5.0), ANYVM_ERROR_INVALID_ARGUMENT, "psychic", "bad probe");

  anyvm_exec_t *e = NULL;
  ok(anyvm_exec_new("sh", &e), "exec_new");
  ok(anyvm_exec_arg(e, "-c"), "arg");
  ok(anyvm_exec_arg(e, "cat; echo \"$GREETING\" >&2; exit 7"), "arg");
  ok(anyvm_exec_env(e, "GREETING", "hello"), "env");
  const unsigned char in[] = {'a', 0, 'b', 0xff};
  ok(anyvm_exec_stdin(e, in, sizeof in), "stdin");
  ok(anyvm_exec_timeout(e, 60.0), "timeout");
  anyvm_exec_result_t *r = NULL;
  ok(anyvm_vm_exec(vm, e, &r), "exec");
  size_t n = 0;
  const uint8_t *out = anyvm_exec_result_stdout(r, &n);
  CHECK(anyvm_exec_result_exited(r) && anyvm_exec_result_exit_code(r) == 7, "exit code %d", anyvm_exec_result_exit_code(r));
  CHECK(n == sizeof in && memcmp(out, in, n) == 0, "stdout has %zu bytes", n);
  const uint8_t *err = anyvm_exec_result_stderr(r, &n);
  CHECK(n == 6 && memcmp(err, "hello\n", 6) == 0, "stderr %.*s", (int)n, (const char *)err);
  /* check(): the core's guest-command error, with the exit code to read back. */
  anyvm_error_t *ce = anyvm_exec_result_check(r);
  int code = 0;
  CHECK(ce && anyvm_error_kind(ce) == ANYVM_ERROR_GUEST_COMMAND, "check kind");
  CHECK(ce && anyvm_error_exit_code(ce, &code) && code == 7, "check exit code %d", code);
  CHECK(ce && strstr(anyvm_error_message(ce), "vm '"), "check message %s", ce ? anyvm_error_message(ce) : "");
  anyvm_error_delete(ce);
  anyvm_exec_result_delete(r);
  anyvm_exec_delete(e);

  /* Streaming: chunks reach the callback as they are written; non-zero from it stops the program. */
  struct chunks got = {0};
  ok(anyvm_exec_new("sh", &e), "exec_new");
  ok(anyvm_exec_arg(e, "-c"), "arg");
  ok(anyvm_exec_arg(e, "echo 1:one; sleep 1; echo 2:two; echo warn >&2"), "arg");
  ok(anyvm_vm_exec_stream(vm, e, on_chunk, &got, &r), "exec_stream");
  CHECK(strcmp(got.out, "1:one\n2:two\n") == 0, "streamed stdout '%s'", got.out);
  CHECK(strcmp(got.err, "warn\n") == 0, "streamed stderr '%s'", got.err);
  CHECK(got.calls >= 2, "%d chunks", got.calls);
  CHECK(anyvm_exec_result_exit_code(r) == 0 && anyvm_exec_result_check(r) == NULL, "stream exit");
  anyvm_exec_result_stdout(r, &n);
  CHECK(n == 0, "streamed result keeps no output (%zu bytes)", n);
  anyvm_exec_result_delete(r);
  anyvm_exec_delete(e);
  struct chunks stop = {0};
  stop.stop_after = 1;
  ok(anyvm_exec_new("sh", &e), "exec_new");
  ok(anyvm_exec_arg(e, "-c"), "arg");
  ok(anyvm_exec_arg(e, "echo up; exec sleep 607"), "arg");
  r = NULL;
  expect_error(anyvm_vm_exec_stream(vm, e, on_chunk, &stop, &r), ANYVM_ERROR_CANCELLED, "cancelled", "callback stop");
  CHECK(r == NULL, "no result after a stop");
  expect_error(anyvm_vm_exec_stream(vm, e, NULL, NULL, &r), ANYVM_ERROR_INVALID_ARGUMENT, "cb", "NULL callback");
  anyvm_exec_delete(e);

  char host[1024], back[1024];
  snprintf(host, sizeof host, "%s/capi-in.txt", work);
  snprintf(back, sizeof back, "%s/capi-back.txt", work);
  FILE *f = fopen(host, "w");
  fputs("copied through the C ABI\n", f);
  fclose(f);
  uint64_t bytes = 0;
  ok(anyvm_vm_copy_to(vm, host, "/tmp/capi.txt", &bytes), "copy_to");
  CHECK(bytes == 25, "copied %llu", (unsigned long long)bytes);
  ok(anyvm_vm_copy_from(vm, "/tmp/capi.txt", back, NULL), "copy_from");
  snprintf(cmd, sizeof cmd, "cmp -s %s %s", host, back);
  CHECK(system(cmd) == 0, "round trip differs");
  expect_error(anyvm_vm_copy_from(vm, "/no/such", back, NULL), ANYVM_ERROR_NOT_FOUND, "No such file", "missing file");

  uint16_t port = 0;
  ok(anyvm_vm_forward_add(vm, "ssh2", 22, 0, &port), "forward_add");
  CHECK(port > 0, "port %u", port);
  char *json = NULL;
  ok(anyvm_vm_forwards_json(vm, &json), "forwards_json");
  CHECK(strstr(json, "\"ssh2\"") != NULL, "%s", json);
  anyvm_string_delete(json);
  ok(anyvm_vm_forward_remove(vm, "ssh2"), "forward_remove");
  expect_error(anyvm_vm_forward_remove(vm, "ssh2"), ANYVM_ERROR_NOT_FOUND, "ssh2", "forward gone");

  char *cfg = NULL;
  ok(anyvm_vm_ssh_config(vm, "root", NULL, &cfg), "ssh_config");
  CHECK(strstr(cfg, "HostKeyAlias") && strstr(cfg, "StrictHostKeyChecking yes"), "%s", cfg);
  anyvm_string_delete(cfg);

  anyvm_stop_outcome_t o;
  ok(anyvm_vm_stop(vm, false, 60.0, &o), "stop");
  CHECK(o == ANYVM_STOP_GRACEFUL, "outcome %d", o);
  expect_error(anyvm_vm_reset(vm), ANYVM_ERROR_INVALID_STATE, "reset", "reset of a stopped vm");
  ok(anyvm_vm_snapshot_take(vm, "s1"), "snapshot");
  ok(anyvm_vm_snapshot_restore(vm, "s1"), "restore");
  expect_error(anyvm_vm_snapshot_restore(vm, "nope"), ANYVM_ERROR_NOT_FOUND, "snapshot", "missing snapshot");
  ok(anyvm_vm_snapshot_delete_with(vm, "s1", ANYVM_WITH_CLONES), "snapshot delete");
  expect_error(anyvm_vm_export(vm, "/tmp/capi.ova"), ANYVM_ERROR_INVALID_STATE, "not supported by the libvirt backend",
               "export on libvirt");
  expect_error(anyvm_vm_export(vm, NULL), ANYVM_ERROR_INVALID_ARGUMENT, "path", "NULL export path");
  ok(anyvm_vm_destroy_with(vm, 0), "destroy");
  anyvm_vm_delete(vm);
  expect_error(anyvm_vm_start(vm), ANYVM_ERROR_INVALID_ARGUMENT, "not a live handle", "vm after delete");
  session_events(events, name);
  anyvm_events_delete(events);
  anyvm_events_delete(events); /* double delete is ignored */
}

static void doctor(anyvm_client_t *client) {
  char *report = NULL;
  bool failed_check = true;
  ok(anyvm_client_doctor(client, &report, &failed_check), "doctor");
  CHECK(strstr(report, "\"name\":\"libvirtd\"") != NULL, "%s", report);
  CHECK(strstr(report, "\"name\":\"state dir\"") != NULL, "%s", report);
  CHECK(failed_check == (strstr(report, "\"status\":\"fail\"") != NULL), "failed flag vs %s", report);
  anyvm_string_delete(report);
  expect_error(anyvm_client_doctor(client, NULL, NULL), ANYVM_ERROR_INVALID_ARGUMENT, "must not be NULL", "doctor NULL out");
}

static void *cancel_later(void *arg) {
  sleep(8);
  anyvm_error_t *e = anyvm_cancel_trigger((anyvm_cancel_t *)arg);
  if (e) anyvm_error_delete(e);
  return NULL;
}

/* Job phases as their callback sees them; "run" can be refused (cancelling the job). */
struct phases {
  char seen[256];
  const char *stop_at;
};

static int on_phase(void *ud, const char *job_id, const char *phase, const char *vm) {
  struct phases *p = ud;
  (void)job_id;
  (void)vm;
  strncat(p->seen, phase, sizeof p->seen - strlen(p->seen) - 2);
  strcat(p->seen, " ");
  return p->stop_at && strcmp(phase, p->stop_at) == 0;
}

static void jobs(anyvm_client_t *client, const char *guest, const char *work) {
  char spec[4096], cmd[4096], tmpl[64], path[1024], out_path[1024];
  snprintf(tmpl, sizeof tmpl, "capi-tmpl-%d", (int)getpid_or_zero());
  snprintf(cmd, sizeof cmd, "cp %s/data.qcow2 %s/tmpl.qcow2 && printf 'abc' > %s/job-in.txt", guest, work, work);
  CHECK(system(cmd) == 0, "copy disk");
  snprintf(spec, sizeof spec,
           "{\"name\":\"%s\",\"memory_mib\":192,\"accel\":\"tcg\","
           "\"boot\":{\"kind\":\"kernel\",\"kernel\":\"%s/vmlinuz\",\"initrd\":\"%s/initrd.img\",\"cmdline\":\"console=ttyS0 quiet\"},"
           "\"disks\":[{\"path\":\"%s/tmpl.qcow2\"}]}",
           tmpl, guest, guest, work);
  anyvm_vm_t *t = NULL;
  ok(anyvm_vm_define_json(client, spec, &t), "define template");

  anyvm_job_t *job = NULL;
  expect_error(anyvm_job_new(client, "bad;name", NULL, "true", &job), ANYVM_ERROR_INVALID_ARGUMENT, "bad;name", "bad template");
  expect_error(anyvm_job_new(client, NULL, NULL, "true", &job), ANYVM_ERROR_INVALID_ARGUMENT, "template", "no template");
  CHECK(job == NULL, "out-parameter written on error");

  ok(anyvm_job_new(client, tmpl, NULL, "sh", &job), "job_new");
  ok(anyvm_job_arg(job, "-c"), "job_arg");
  ok(anyvm_job_arg(job, "cat /work/in.txt; echo $TAG; cp /work/in.txt /work/out.txt"), "job_arg");
  ok(anyvm_job_env(job, "TAG", "c-abi"), "job_env");
  snprintf(path, sizeof path, "%s/job-in.txt", work);
  ok(anyvm_job_input(job, path, "/work/in.txt"), "job_input");
  snprintf(out_path, sizeof out_path, "%s/results/out.txt", work);
  ok(anyvm_job_output(job, "/work/out.txt", out_path), "job_output");
  ok(anyvm_job_timeout(job, 120), "job_timeout");
  expect_error(anyvm_job_timeout(job, -1), ANYVM_ERROR_INVALID_ARGUMENT, "timeout", "negative timeout");
  struct phases ph = {{0}, NULL};
  ok(anyvm_job_on_phase(job, on_phase, &ph), "job_on_phase");
  anyvm_job_report_t *rep = NULL;
  ok(anyvm_job_run(job, NULL, &rep), "job_run");
  CHECK(strcmp(ph.seen, "clone boot ready stage_in run stage_out teardown ") == 0, "phases '%s'", ph.seen);
  CHECK(anyvm_job_report_outcome(rep) == ANYVM_JOB_SUCCEEDED, "outcome %d", anyvm_job_report_outcome(rep));
  CHECK(anyvm_job_report_exit_status(rep) == 0, "status %d", anyvm_job_report_exit_status(rep));
  size_t n = 0;
  const uint8_t *o = anyvm_job_report_stdout(rep, &n);
  CHECK(n == 9 && memcmp(o, "abcc-abi\n", 9) == 0, "stdout %.*s", (int)n, (const char *)o);
  char *json = NULL;
  ok(anyvm_job_report_json(rep, &json), "report json");
  CHECK(strstr(json, "\"teardown\"") && strstr(json, "\"succeeded\""), "%s", json);
  anyvm_string_delete(json);
  anyvm_job_report_delete(rep);
  snprintf(cmd, sizeof cmd, "test \"$(cat %s)\" = abc", out_path);
  CHECK(system(cmd) == 0, "output staged out");
  anyvm_job_delete(job);

  /* A failing command and a missing input: results, not errors. */
  ok(anyvm_job_new(client, tmpl, NULL, "sh", &job), "job_new");
  ok(anyvm_job_arg(job, "-c"), "arg");
  ok(anyvm_job_arg(job, "exit 3"), "arg");
  ok(anyvm_job_run(job, NULL, &rep), "run failing");
  CHECK(anyvm_job_report_outcome(rep) == ANYVM_JOB_FAILED && anyvm_job_report_exit_status(rep) == 3,
        "failing: outcome %d status %d", anyvm_job_report_outcome(rep), anyvm_job_report_exit_status(rep));
  anyvm_job_report_delete(rep);
  ok(anyvm_job_input(job, "/nonexistent/input", "/x"), "input");
  ok(anyvm_job_run(job, NULL, &rep), "run with missing input");
  CHECK(anyvm_job_report_outcome(rep) == ANYVM_JOB_ERROR && anyvm_job_report_exit_status(rep) == 125,
        "missing input: outcome %d", anyvm_job_report_outcome(rep));
  anyvm_job_report_delete(rep);
  anyvm_job_delete(job);

  /* A phase callback that refuses "run" cancels the job before the command. */
  struct phases stop = {{0}, "run"};
  ok(anyvm_job_new(client, tmpl, NULL, "true", &job), "job_new");
  ok(anyvm_job_on_phase(job, on_phase, &stop), "job_on_phase stop");
  ok(anyvm_job_run(job, NULL, &rep), "run refused by callback");
  CHECK(anyvm_job_report_outcome(rep) == ANYVM_JOB_CANCELLED, "refused: outcome %d", anyvm_job_report_outcome(rep));
  CHECK(strstr(stop.seen, "run teardown") != NULL, "refused phases '%s'", stop.seen);
  anyvm_job_report_delete(rep);
  ok(anyvm_job_on_phase(job, NULL, NULL), "job_on_phase off");
  anyvm_job_delete(job);

  /* Cancelled from another thread while it runs: the clone is removed. */
  anyvm_cancel_t *c = NULL;
  ok(anyvm_cancel_new(&c), "cancel_new");
  ok(anyvm_job_new(client, tmpl, NULL, "sleep", &job), "job_new");
  ok(anyvm_job_arg(job, "300"), "arg");
  pthread_t th;
  pthread_create(&th, NULL, cancel_later, c);
  ok(anyvm_job_run(job, c, &rep), "run cancelled");
  pthread_join(th, NULL);
  CHECK(anyvm_job_report_outcome(rep) == ANYVM_JOB_CANCELLED, "outcome %d", anyvm_job_report_outcome(rep));
  anyvm_job_report_delete(rep);
  anyvm_job_delete(job);
  anyvm_cancel_delete(c);
  expect_error(anyvm_cancel_trigger(c), ANYVM_ERROR_INVALID_ARGUMENT, "not a live handle", "cancel after delete");

  char *gc = NULL;
  ok(anyvm_client_gc(client, true, &gc), "gc");
  char prefix[80];
  snprintf(prefix, sizeof prefix, "\"%s-", tmpl);
  CHECK(strstr(gc, prefix) == NULL, "a job clone is left: %s", gc);
  anyvm_string_delete(gc);
  ok(anyvm_vm_destroy(t), "destroy template");
  anyvm_vm_delete(t);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s GUEST_DIR WORK_DIR\n", argv[0]);
    return 2;
  }
  anyvm_client_t *client = NULL;
  char state[1024];
  snprintf(state, sizeof state, "%s/state", argv[2]);
  ok(anyvm_client_open("libvirt:qemu:///system", state, &client), "client_open");
  argument_checks(client);
  doctor(client);
  session(client, argv[1], argv[2]);
  jobs(client, argv[1], argv[2]);
  anyvm_client_delete(client);
  anyvm_client_delete(client); /* double delete is ignored */
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
