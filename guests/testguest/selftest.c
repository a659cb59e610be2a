/* Host test of the command-line parser (built and run by scripts/build-testguest --selftest). */
#include <stdio.h>
#include <string.h>

#include "cmdline.h"

static int passed, failed;

static void check(int ok, const char *what, const char *line)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL: %s: \"%s\"\n", what, line);
    }
}

static void accepts(const char *line, enum testguest_mode mode, uint64_t work, uint64_t iters,
                    uint64_t oob_after)
{
    struct testguest_options o;
    char err[CMDLINE_ERROR_MAX] = "unset";
    int rc = testguest_parse_cmdline(line, strlen(line), &o, err);
    if (rc != 0)
        printf("  error was: %s\n", err);
    check(rc == 0 && o.mode == mode && o.work == work && o.iters == iters &&
              o.oob_after == oob_after && err[0] == 0,
          "accepts", line);
}

static void rejects(const char *line, const char *expected_error)
{
    struct testguest_options o = { .mode = MODE_IDLE, .work = 7, .iters = 7, .oob_after = 7 };
    char err[CMDLINE_ERROR_MAX];
    memset(err, 'x', sizeof err);
    int rc = testguest_parse_cmdline(line, strlen(line), &o, err);
    int ok = rc == -1 && memchr(err, 0, sizeof err) && strcmp(err, expected_error) == 0 &&
             o.mode == MODE_IDLE && o.work == 7;
    if (!ok)
        printf("  got rc=%d error \"%.*s\", expected \"%s\"\n", rc, (int)sizeof err, err, expected_error);
    check(ok, "rejects", line);
}

int main(void)
{
    accepts("mode=barrier", MODE_BARRIER, 2000, 0, 100);
    accepts("mode=cpubound", MODE_CPUBOUND, 2000, 0, 100);
    accepts("mode=idle", MODE_IDLE, 2000, 0, 100);
    accepts("mode=oob oob_after=5", MODE_OOB, 2000, 0, 5);
    {
        struct testguest_options o;
        char err[CMDLINE_ERROR_MAX];
        const char *line = "mode=hostile attack=ipi-flood oob_after=3";
        check(testguest_parse_cmdline(line, strlen(line), &o, err) == 0 && o.mode == MODE_HOSTILE &&
                  o.attack == ATTACK_IPI_FLOOD && o.oob_after == 3 &&
                  strcmp(testguest_attack_name(o.attack), "ipi-flood") == 0,
              "an attack by name", line);
    }
    accepts("mode=barrier work=500 iters=1000", MODE_BARRIER, 500, 1000, 100);
    accepts("  iters=3\twork=0   mode=cpubound  ", MODE_CPUBOUND, 0, 3, 100);
    accepts("mode=idle mode=barrier", MODE_BARRIER, 2000, 0, 100);
    accepts("mode=barrier iters=18446744073709551615", MODE_BARRIER, 2000, UINT64_MAX, 100);

    /* The length bounds the line; a NUL ends it early. */
    {
        struct testguest_options o;
        char err[CMDLINE_ERROR_MAX];
        const char *line = "mode=cpubound work=12garbage";
        check(testguest_parse_cmdline(line, strlen("mode=cpubound work=12"), &o, err) == 0 &&
                  o.work == 12,
              "length bounds the line", line);
        const char nul[] = "mode=idle\0work=x";
        check(testguest_parse_cmdline(nul, sizeof nul - 1, &o, err) == 0 && o.mode == MODE_IDLE,
              "NUL ends the line", nul);
    }

    rejects("mode=fast", "unknown mode (docs/testguest.md) in 'mode=fast'");
    rejects("mode=", "unknown mode (docs/testguest.md) in 'mode='");
    rejects("mode=barrierx", "unknown mode (docs/testguest.md) in 'mode=barrierx'");
    rejects("mode=barrier work=12x", "malformed number (decimal expected) in 'work=12x'");
    rejects("mode=barrier work=", "malformed number (decimal expected) in 'work='");
    rejects("mode=barrier iters=-1", "malformed number (decimal expected) in 'iters=-1'");
    rejects("mode=barrier iters=0x10", "malformed number (decimal expected) in 'iters=0x10'");
    rejects("mode=barrier iters=18446744073709551616",
            "malformed number (decimal expected) in 'iters=18446744073709551616'");
    rejects("mode=barrier iter=5", "unknown option (mode, work, iters, oob_after, attack, shared, revoke_after) 'iter=5'");
    rejects("mode=barrier verbose", "expected key=value, got 'verbose'");
    rejects("=5 mode=barrier", "expected key=value, got '=5'");
    rejects("work=5", "missing mode=barrier|cpubound|oob|idle|hostile|manager|writer|reader in 'work=5'");
    rejects("", "missing mode=barrier|cpubound|oob|idle|hostile|manager|writer|reader in ''");
    rejects("mode=hostile attack=rowhammer", "unknown attack (docs/testguest.md) in 'attack=rowhammer'");
    rejects("mode=hostile", "attack= goes with mode=hostile, and mode=hostile needs one: 'mode=hostile'");
    rejects("mode=idle attack=ports", "attack= goes with mode=hostile, and mode=hostile needs one: 'mode=idle attack=ports'");
    rejects("mode=barrier work=123456789012345678901234567890123456789012345678901234567890",
            "malformed number (decimal expected) in 'work=12345678901234567890123456789012345'");

    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
