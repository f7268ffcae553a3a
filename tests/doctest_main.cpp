// The one doctest runner shared by every tests/test_*.cpp executable.
//
// It behaves like DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN, plus one rule: when a binary has test cases
// but every one of them was skipped (for example all are marked `* doctest::skip(!has_device)`),
// it exits with 77, which CTest reports as "Skipped" (SKIP_RETURN_CODE 77).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

namespace {

constexpr int skip_return_code = 77;

struct run_totals {
  bool finished = false;
  unsigned test_cases = 0;
  unsigned test_cases_run = 0;
  unsigned test_cases_failed = 0;
};

run_totals totals;

struct run_totals_listener final : doctest::IReporter {
  explicit run_totals_listener(const doctest::ContextOptions&) {}

  void test_run_end(const doctest::TestRunStats& stats) override {
    totals.finished = true;
    totals.test_cases = stats.numTestCases;
    totals.test_cases_run = stats.numTestCasesPassingFilters;
    totals.test_cases_failed = stats.numTestCasesFailed;
  }

  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_case_start(const doctest::TestCaseData&) override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};

}  // namespace

REGISTER_LISTENER("compact_run_totals", 1, run_totals_listener);

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  const int result = context.run();
  if (context.shouldExit() || result != 0) {
    return result;
  }
  if (totals.finished && totals.test_cases > 0 && totals.test_cases_run == 0 &&
      totals.test_cases_failed == 0) {
    return skip_return_code;
  }
  return result;
}
